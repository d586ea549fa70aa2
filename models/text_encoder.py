"""Moved to models/wan/text_encoder.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.text_encoder."""

import sys

from models.wan import text_encoder

sys.modules[__name__] = text_encoder

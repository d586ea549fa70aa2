"""Moved to models/wan/fused.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.fused."""

import sys

from models.wan import fused

sys.modules[__name__] = fused

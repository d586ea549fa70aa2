"""Moved to models/wan/checkpoint.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.checkpoint."""

import sys

from models.wan import checkpoint

sys.modules[__name__] = checkpoint

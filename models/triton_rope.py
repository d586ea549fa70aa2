"""Moved to models/wan/triton_rope.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.triton_rope."""

import sys

from models.wan import triton_rope

sys.modules[__name__] = triton_rope

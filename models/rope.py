"""Moved to models/wan/rope.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.rope."""

import sys

from models.wan import rope

sys.modules[__name__] = rope

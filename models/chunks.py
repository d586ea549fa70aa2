"""Moved to models/common/chunks.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.chunks."""

import sys

from models.common import chunks

sys.modules[__name__] = chunks

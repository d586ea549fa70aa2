"""Moved to models/common/triton_common.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.triton_common."""

import sys

from models.common import triton_common

sys.modules[__name__] = triton_common

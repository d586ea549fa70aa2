"""Moved to models/common/attention_kernels.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.attention_kernels."""

import sys

from models.common import attention_kernels

sys.modules[__name__] = attention_kernels

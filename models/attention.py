"""Moved to models/common/attention.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.attention."""

import sys

from models.common import attention

sys.modules[__name__] = attention

"""Moved to models/common/kv_cache.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.kv_cache."""

import sys

from models.common import kv_cache

sys.modules[__name__] = kv_cache

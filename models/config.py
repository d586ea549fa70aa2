"""Moved to models/wan/config.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.config."""

import sys

from models.wan import config

sys.modules[__name__] = config

"""Moved to training/config.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
training.config."""

import sys

from training import config

sys.modules[__name__] = config

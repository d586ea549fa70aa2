"""Moved to models/common/window.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.window."""

import sys

from models.common import window

sys.modules[__name__] = window

"""Moved to models/wan/accel.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.accel."""

import sys

from models.wan import accel

sys.modules[__name__] = accel

"""Moved to models/common/flex.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.flex."""

import sys

from models.common import flex

sys.modules[__name__] = flex

"""Moved to models/common/labels.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.labels."""

import sys

from models.common import labels

sys.modules[__name__] = labels

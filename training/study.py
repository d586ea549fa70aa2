"""Moved to studies/training.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
studies.training."""

import sys

from studies import training

sys.modules[__name__] = training

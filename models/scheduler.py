"""Moved to models/common/scheduler.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.scheduler."""

import sys

from models.common import scheduler

sys.modules[__name__] = scheduler

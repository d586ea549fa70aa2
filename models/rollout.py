"""Moved to models/common/rollout.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.rollout."""

import sys

from models.common import rollout

sys.modules[__name__] = rollout

"""Moved to models/common/triton_attention_plan.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.common.triton_attention_plan."""

import sys

from models.common import triton_attention_plan

sys.modules[__name__] = triton_attention_plan

"""Moved to models/wan/triton_vae.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.triton_vae."""

import sys

from models.wan import triton_vae

sys.modules[__name__] = triton_vae

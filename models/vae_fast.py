"""Moved to models/wan/vae_fast.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.vae_fast."""

import sys

from models.wan import vae_fast

sys.modules[__name__] = vae_fast

"""Moved to models/wan/vae.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too. Code in this repository imports
models.wan.vae."""

import sys

from models.wan import vae

sys.modules[__name__] = vae

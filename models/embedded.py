"""Moved to models/wan/embedded.py; this old path is kept for user scripts.

It is the same module object, so its private names and monkeypatches work too, and `python -m models.embedded`
still runs the new module."""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("models.wan.embedded", run_name="__main__", alter_sys=True)
else:
    from models.wan import embedded

    sys.modules[__name__] = embedded

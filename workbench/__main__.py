"""`python -m workbench ...`: the same command line as the `workbench` script (workbench/cli.py)."""

import sys

from workbench.cli import main

if __name__ == "__main__":
    sys.exit(main())

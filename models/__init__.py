"""The models: the causal Wan family (models/wan/), what every family shares (models/common/), the miniature world
(models/world.py). Nothing here knows of the workbench, training or studies (one old path aside:
models/sf_config.py, kept for users' scripts, is an alias of training/config.py).

Importing the package checks the installed torch's version from its metadata (torch itself is not imported):
an older torch failed deep in a run, with an AttributeError on the first CUDA forward or an ImportError when
training began, instead of saying which version is needed.
"""

import re
from importlib import metadata

# the oldest torch the tests pass on (pyproject.toml says why: 2.8's gloo doubled two-process CPU training's
# gradients; 2.10 and older fail the CPU fp8 tests and round the CPU bf16 rollout further from float64)
TORCH_NEEDED = (2, 11)


def check_torch(version: str | None = None) -> None:
    """ImportError naming the installed and the needed torch when `version` (default: the installed one's
    metadata) is older than TORCH_NEEDED; nothing when torch has no metadata (its own import then decides)."""
    if version is None:
        try:
            version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            return
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) < TORCH_NEEDED:
        needed = ".".join(map(str, TORCH_NEEDED))
        raise ImportError(f"the workbench needs torch >= {needed} (found {version}): older ones fail its tests (2.8 "
                          "doubled two-process CPU training's gradients silently; CPU fp8 and bf16; pyproject.toml "
                          f"says more); pip install 'torch>={needed}'")


check_torch()

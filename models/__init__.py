"""The models: the causal Wan family (models/wan/), what every family shares (models/common/), the miniature world
(models/world.py). Nothing here knows of the workbench, training or studies.

Importing the package checks the installed torch's version from its metadata (torch itself is not imported):
an older torch failed deep in a run, with an AttributeError on the first CUDA forward or an ImportError when
training began, instead of saying which version is needed.
"""

import re
from importlib import metadata

TORCH_NEEDED = (2, 7)  # dynamo's recompile_limit (models/wan/fused.py, 2.7), the public FSDP2 API (2.6)


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
        raise ImportError(f"the workbench needs torch >= {needed} (found {version}): torch._dynamo.config."
                          "recompile_limit (models/wan/fused.py) and torch.distributed.fsdp.fully_shard "
                          f"(training/distributed.py) are newer; pip install 'torch>={needed}'")


check_torch()

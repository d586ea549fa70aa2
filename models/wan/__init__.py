"""The Wan2.1 family: the DiT (model.py), its config and presets (config.py), checkpoint layouts (checkpoint.py),
pointwise fusion, RoPE and their CUDA kernels (fused.py, rope.py, triton_rope.py, triton_norms.py), the umT5
text encoder (text_encoder.py), the VAE (vae.py, vae_fast.py, triton_vae.py), the embedded miniature models
(embedded.py) and the optional inference accelerations (accel.py). The family-independent parts they use are
models/common/.

This package replaces the module models/wan.py. For user scripts, `from models.wan import WanModel` (any name
that module defined) still works: such a name is read from models.wan.model on first use, so importing a
submodule (models.wan.config, which needs no torch) does not import the DiT. Code in this repository imports
from models.wan.model directly.
"""

import importlib
from pathlib import Path


def __getattr__(name: str):
    if (Path(__file__).parent / f"{name}.py").is_file():  # a submodule not imported yet (`from models.wan import vae`)
        return importlib.import_module(f"{__name__}.{name}")
    model = importlib.import_module(f"{__name__}.model")
    if name == "__all__":  # `from models.wan import *`: the public names of the old module
        return [n for n in vars(model) if not n.startswith("_")]
    try:
        return getattr(model, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

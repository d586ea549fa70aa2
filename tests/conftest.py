"""Shared fixtures: small seeded models that keep the real frame structure (chunks of 3 latent frames)."""

import pytest
import torch

from models.config import preset
from models.wan import WanModel


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_model(causal=True, seed=0, **overrides) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(preset("tiny", **overrides), causal=causal).eval()
    with torch.no_grad():  # peaked attention, so that wrong masks or positions show in the outputs
        for block in model.blocks:
            for attn in (block.self_attn, block.cross_attn):
                attn.norm_q.weight.uniform_(1.0, 3.0)
                attn.norm_k.weight.uniform_(1.0, 3.0)
    return model


@pytest.fixture
def one_thread():
    """Tiny models: one thread is ~40x faster than two on a busy 2-core machine (op overhead, not FLOPs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return tiny_model()

"""The model family entry (models/family.py): the sizes the CLI used to hard-code, the geometry of a folder,
and the one KV-cache check."""

import json
import re

import pytest

from models.errors import ModelInputError
from models.family import WAN, check_fits_cache, family_of
from models.wan.config import WanConfig
from models.wan.embedded import EMBEDDED_DIR, EMBEDDED_GEOMETRY, EMBEDDED_VIDEO_SIZE


def test_wan_defaults_are_the_self_forcing_geometry():
    assert WAN.video_size == (480, 832) and WAN.latent_size == (60, 104)
    assert WanConfig().tokens_per_frame(*WAN.latent_size) == 1560  # 30 x 52 patches of 2 x 2
    assert (WAN.frames_per_chunk, WAN.cache_frames) == (3, 21)
    assert 1 + WAN.vae_time_stride * (WAN.cache_frames - 1) == 81  # 21 latent frames <-> 81 video frames


def test_geometry_of_a_folder_and_of_a_size(tmp_path):
    config, h, w, tokens = family_of(EMBEDDED_DIR).video_geometry(EMBEDDED_DIR)
    assert EMBEDDED_VIDEO_SIZE == (8 * h, 8 * w)
    assert (h, w) == (EMBEDDED_GEOMETRY.latent_height, EMBEDDED_GEOMETRY.latent_width)
    assert tokens == (h // 2) * (w // 2)
    folder = tmp_path / "wan"  # a folder that records no video_size runs at the family's size
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dim": 1536, "num_heads": 12, "num_layers": 30}))
    assert WAN.video_geometry(folder)[1:] == (60, 104, 1560)
    assert WAN.video_geometry(folder, 64, 96)[1:] == (8, 12, 24)
    with pytest.raises(ModelInputError, match="--height 100: use a positive multiple of 16"):
        WAN.video_geometry(folder, 100, 96)


def test_the_cache_check():
    check_fits_cache(21, -1)
    check_fits_cache(84, 9)  # a rolling window holds any length
    with pytest.raises(ModelInputError, match=r"--frames 24: more than the KV cache holds \(21 frames\)"):
        check_fits_cache(24, -1, label="--frames 24")
    check_fits_cache(24, -1, 24)


def test_an_older_torch_is_named_when_the_models_are_imported():
    """pyproject's torch bound is checked at import (an older torch failed on the first CUDA forward with an
    AttributeError on dynamo's config, or when training began with an ImportError), from torch's metadata."""
    from models import TORCH_NEEDED, check_torch

    assert TORCH_NEEDED == (2, 11)
    with pytest.raises(ImportError, match=r"needs torch >= 2\.11 \(found 2\.5\.1\).*pip install 'torch>=2\.11'"):
        check_torch("2.5.1")
    for old in ("2.6.0+cu124", "2.8.0", "2.10.1"):  # (2.8: two-process CPU training's gradients doubled)
        with pytest.raises(ImportError, match=f"found {re.escape(old)}"):
            check_torch(old)
    for fine in ("2.11.0+cu130", "2.13.0+cpu", "2.15.0", "3.0.0.dev20270101"):
        check_torch(fine)
    check_torch()  # (the installed one)

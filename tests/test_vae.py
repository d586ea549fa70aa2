"""The Wan2.1 VAE (models/wan/vae.py): key map, latent normalisation, frame law, streaming = whole decode, errors.

The Wan names and shapes come from `wan_vae_shapes` in data/embedded/make_text_and_vae.py, an enumeration
written from Wan's Encoder3d/Decoder3d constructors (independent of models/wan/vae.py). The key map is checked
against diffusers' own `convert_wan_vae_to_diffusers`, both on names and by decoding/encoding through a
diffusers model loaded with that converter; a mutation test shows the decode comparison catches swapped tensors.
"""

from pathlib import Path

import pytest
import torch

from conftest import SMALL_VAE, embedded_maker, push_in_chunks
from models.errors import CheckpointError, ModelInputError
from models.wan.vae import (LATENTS_MEAN, LATENTS_STD, VAELayout, WanVAE, diffusers_to_wan_key, infer_layout,
                        latent_frames, pixel_frames, wan_to_diffusers_key)

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "embedded"
make = embedded_maker()


class PickledDict(dict):
    """A dict subclass: torch.load(weights_only=True) refuses to rebuild it."""


@pytest.fixture(scope="module")
def small_vae(small_sd):
    return WanVAE.from_state_dict(small_sd)


@pytest.fixture(scope="module")
def reference(small_sd):
    """diffusers' AutoencoderKLWan loaded through diffusers' own Wan converter (not our key map)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True])
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(small_sd)), strict=True)
    return ref.eval()


def _stats():
    mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)
    return mean, std


# ---------------------------------------------------------------------------------------------------------
# Key map
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_dim", [4, 96])
def test_key_map_equals_diffusers_converter(base_dim):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    shapes = make.wan_vae_shapes(**{**SMALL_VAE, "base_dim": base_dim})
    names = {k: torch.empty(0) for k in shapes}
    theirs = {id(v): k for k, v in convert_wan_vae_to_diffusers(names).items()}
    assert len(theirs) == len(names)
    for wan_key, tensor in names.items():
        assert wan_to_diffusers_key(wan_key, 2) == theirs[id(tensor)], wan_key


@pytest.mark.parametrize("num_res_blocks", [1, 2, 3])
def test_key_map_is_a_bijection_onto_the_diffusers_model(num_res_blocks):
    from diffusers import AutoencoderKLWan

    shapes = make.wan_vae_shapes(**{**SMALL_VAE, "num_res_blocks": num_res_blocks})
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=4, z_dim=16, num_res_blocks=num_res_blocks)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {wan_to_diffusers_key(k, num_res_blocks): s for k, s in shapes.items()}
    assert mapped == target  # same names, same shapes, nothing left over on either side
    for k in shapes:
        assert diffusers_to_wan_key(wan_to_diffusers_key(k, num_res_blocks), num_res_blocks) == k
    for k in target:
        assert wan_to_diffusers_key(diffusers_to_wan_key(k, num_res_blocks), num_res_blocks) == k


def test_layout_is_read_from_shapes():
    real = {k: torch.empty(s, device="meta") for k, s in make.wan_vae_shapes().items()}
    assert infer_layout(real) == VAELayout(96, 16, (1, 2, 4, 4), 2, (False, True, True))
    odd = {k: torch.empty(s, device="meta")
           for k, s in make.wan_vae_shapes(base_dim=8, dim_mult=(1, 3, 3, 5), num_res_blocks=1).items()}
    assert infer_layout(odd) == VAELayout(8, 16, (1, 3, 3, 5), 1, (False, True, True))
    vae = WanVAE.from_state_dict(make.wan_vae_state_dict(make.wan_vae_shapes(**{**SMALL_VAE, "num_res_blocks": 1})))
    assert vae.layout.num_res_blocks == 1 and vae.decode(torch.randn(1, 2, 16, 2, 2)).shape == (1, 3, 5, 16, 16)


def test_decode_and_encode_equal_diffusers_loaded_with_its_own_converter(small_vae, reference):
    mean, std = _stats()
    torch.manual_seed(1)
    latents = torch.randn(1, 3, 16, 4, 6)                               # [B, F, C, h, w], normalised
    ours = small_vae.decode(latents)
    with torch.no_grad():
        theirs = reference.decode(latents.permute(0, 2, 1, 3, 4) * std + mean).sample
    assert ours.shape == (1, 3, 9, 32, 48)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    ours_z = small_vae.encode(video)
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mean                  # [B, 16, F, h, w]
    assert ours_z.shape == (1, 3, 16, 4, 6)
    torch.testing.assert_close(ours_z, ((mu - mean) / std).permute(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("swap", [
    ("decoder.upsamples.0.residual.2.weight", "decoder.upsamples.0.residual.6.weight"),
    ("decoder.upsamples.1.residual.3.gamma", "decoder.upsamples.2.residual.3.gamma"),
    ("decoder.middle.0.residual.2.bias", "decoder.middle.2.residual.2.bias"),
])
def test_decode_comparison_catches_a_wrong_key_map(small_sd, reference, swap):
    wrong = dict(small_sd)
    assert wrong[swap[0]].shape == wrong[swap[1]].shape
    wrong[swap[0]], wrong[swap[1]] = small_sd[swap[1]], small_sd[swap[0]]
    mean, std = _stats()
    torch.manual_seed(1)
    latents = torch.randn(1, 2, 16, 4, 6)
    with torch.no_grad():
        theirs = reference.decode(latents.permute(0, 2, 1, 3, 4) * std + mean).sample
    assert (WanVAE.from_state_dict(wrong).decode(latents) - theirs).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Normalisation, frame law, streaming
# ---------------------------------------------------------------------------------------------------------

def test_latent_normalisation_is_self_forcings():
    """z_norm = (mu - mean) / std and back; channel 7 has mean 1.5508, std 2.0743 (WanVAEWrapper)."""
    vae = WanVAE.from_file(EMBEDDED / "Wan2.1_VAE.pth")
    mu = torch.zeros(1, 16, 2, 3, 3)
    mu[:, 7] = 1.5508 + 2.0743
    z = vae.normalise(mu)                                               # [1, 2, 16, 3, 3]
    assert z.shape == (1, 2, 16, 3, 3)
    torch.testing.assert_close(z[:, :, 7], torch.ones(1, 2, 3, 3))
    torch.testing.assert_close(vae.unnormalise(z), mu)


def test_frame_law():
    assert pixel_frames(21) == 81 and pixel_frames(3) == 9 and pixel_frames(1) == 1
    assert latent_frames(81) == 21 and latent_frames(1) == 1
    for bad in (0, 8, 80):
        with pytest.raises(ModelInputError):
            latent_frames(bad)


@pytest.mark.parametrize("f", [1, 2, 5])
def test_decode_shape_and_range(small_vae, f):
    video = small_vae.decode(torch.randn(2, f, 16, 3, 5))
    assert video.shape == (2, 3, 1 + 4 * (f - 1), 24, 40) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1


@pytest.mark.parametrize("chunks", [[3, 3, 1], [1] * 7, [2, 5], [7]])
def test_streaming_decode_equals_whole_decode(small_vae, chunks):
    torch.manual_seed(2)
    latents = torch.randn(1, sum(chunks), 16, 4, 6)
    whole = small_vae.decode(latents)
    assert (whole.abs() >= 1).float().mean() < 0.05  # mostly unclamped: the equality below is not trivial
    stream = small_vae.stream_decoder()
    torch.testing.assert_close(push_in_chunks(stream, latents, chunks), whole, rtol=1e-6, atol=1e-6)
    assert stream.frames_in == sum(chunks) and stream.frames_out == whole.shape[2]


def test_embedded_vae_21_latents_to_81_frames_streamed_in_chunks_of_3():
    vae = WanVAE.from_file(EMBEDDED / "Wan2.1_VAE.pth")
    assert vae.layout == VAELayout(8, 16, (1, 1, 2, 4), 1, (False, True, True))  # the world VAE (training/world_vae.py)
    torch.manual_seed(3)
    latents = torch.randn(1, 21, 16, 12, 16)
    whole = vae.decode(latents)
    assert whole.shape == (1, 3, 81, 96, 128)
    stream = vae.stream_decoder()
    parts = [stream.push(latents[:, i:i + 3]) for i in range(0, 21, 3)]
    assert [p.shape[2] for p in parts] == [9] + [12] * 6
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-6, atol=1e-6)


def test_encode_then_decode_keeps_shapes(small_vae):
    video = torch.rand(2, 3, 13, 16, 24) * 2 - 1
    z = small_vae.encode(video)
    assert z.shape == (2, 4, 16, 2, 3)
    assert small_vae.decode(z).shape == video.shape


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope_VAE.pth"):
        WanVAE.from_file(tmp_path / "nope_VAE.pth")


def test_missing_unexpected_and_mismatched_keys_are_listed(small_sd, tmp_path):
    bad = dict(small_sd)
    del bad["decoder.upsamples.5.residual.6.bias"]
    bad["decoder.upsamples.5.extra.weight"] = torch.zeros(1)
    bad["decoder.head.2.weight"] = torch.zeros(3, 5, 3, 3, 3)
    path = tmp_path / "bad_vae.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as err:
        WanVAE.from_file(path)
    msg = str(err.value)
    assert str(path) in msg and "decoder.upsamples.5.residual.6.bias" in msg
    assert "decoder.upsamples.5.extra.weight" in msg and "decoder.head.2.weight" in msg


def test_not_a_vae_and_wrong_z_dim_are_refused(small_sd):
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE"):
        WanVAE.from_state_dict({"token_embedding.weight": torch.zeros(2, 2)})
    sd8 = make.wan_vae_state_dict(make.wan_vae_shapes(**{**SMALL_VAE, "z_dim": 8}))
    with pytest.raises(CheckpointError, match="z_dim"):
        WanVAE.from_state_dict(sd8)


def test_pickle_needing_file_is_refused_unless_trusted(small_sd, tmp_path):
    path = tmp_path / "pickled_vae.pth"
    torch.save(PickledDict(small_sd), path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        WanVAE.from_file(path)
    assert WanVAE.from_file(path, trust_pickle=True).layout.base_dim == 4


def test_bad_inputs_are_refused(small_vae):
    with pytest.raises(ModelInputError, match="16"):
        small_vae.decode(torch.randn(1, 3, 8, 4, 4))
    with pytest.raises(ModelInputError, match="1 \\+ 4k"):
        small_vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ModelInputError, match="multiples of 8"):
        small_vae.encode(torch.zeros(1, 3, 5, 12, 16))
    stream = small_vae.stream_decoder()
    stream.push(torch.randn(1, 1, 16, 2, 2))
    with pytest.raises(ModelInputError, match="new stream_decoder"):
        stream.push(torch.randn(1, 1, 16, 2, 3))


# ---------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embedded_vae_on_cuda_matches_cpu_and_streams(monkeypatch):
    # fp32 against the CPU: cuDNN convolutions default to TF32 (10-bit mantissa), which compounds over the
    # decoder's ~30 convolutions; the comparison is of the same fp32 math, so TF32 is off here
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(4)
    latents = torch.randn(1, 9, 16, 12, 16)
    ref = WanVAE.from_file(EMBEDDED / "Wan2.1_VAE.pth").decode(latents)
    fp32 = WanVAE.from_file(EMBEDDED / "Wan2.1_VAE.pth", device="cuda")
    out = fp32.decode(latents.cuda())
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
    stream = fp32.stream_decoder()
    parts = [stream.push(latents[:, i:i + 3].cuda()) for i in range(0, 9, 3)]
    torch.testing.assert_close(torch.cat(parts, dim=2), out, rtol=1e-4, atol=1e-4)
    bf16 = WanVAE.from_file(EMBEDDED / "Wan2.1_VAE.pth", device="cuda", dtype=torch.bfloat16)
    low = bf16.decode(latents.cuda())
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - out).abs().mean() < 0.05

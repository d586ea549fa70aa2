"""The fast VAE decoder (models/wan/vae_fast.py) and the overlapped stream decoder (models/wan/vae.py).

- The fast decoder computes the reference decoder's function: bitwise equal in float64 (diffusers' upsampler
  rounds to float32 there, and the fast one does the same), within float32 rounding in float32; whole decodes
  and every chunking of a stream give the same bits; a newer stream on the same VAE makes an older one refuse.
- `push_async` is `push` off CUDA (same bits); on a GPU, the overlapped decode equals the plain one bitwise.
- The Triton RMSNorm + SiLU kernel equals the PyTorch code, and its bias and the sums kernel give PyTorch's bits,
  run by Triton's interpreter on the CPU (and compiled on a GPU); the temporal taps compute the 3D convolution.
"""

import textwrap

import pytest
import torch

from conftest import push_in_chunks, run_triton_check
from models.errors import ModelInputError
from models.wan.vae import WanVAE, resolve_decoder


def _pair(sd, dtype, device="cpu"):
    return (WanVAE.from_state_dict(sd, dtype=dtype, device=device, decoder="reference"),
            WanVAE.from_state_dict(sd, dtype=dtype, device=device, decoder="fast"))


@pytest.mark.parametrize("B,F,h,w", [(1, 1, 2, 2), (2, 5, 3, 5), (1, 6, 4, 3)])
def test_fast_decoder_equals_reference_in_float64(small_sd, B, F, h, w, one_thread):
    ref, fast = _pair(small_sd, torch.float64)
    torch.manual_seed(B * 100 + F)
    z = torch.randn(B, F, 16, h, w)
    a, b = ref.decode(z), fast.decode(z)
    assert b.shape == a.shape == (B, 3, 1 + 4 * (F - 1), 8 * h, 8 * w) and b.dtype == torch.float32
    assert (a.abs() < 1).float().mean() > 0.9  # mostly unclamped: the comparison is not of constants
    assert torch.equal(a, b)


def test_fast_decoder_float32_within_rounding(small_sd, one_thread):
    ref, fast = _pair(small_sd, torch.float32)
    torch.manual_seed(1)
    z = torch.randn(1, 5, 16, 3, 4)
    torch.testing.assert_close(fast.decode(z), ref.decode(z), rtol=0, atol=2e-5)


def test_the_fast_decoder_follows_weights_loaded_into_the_model(small_sd, one_thread):
    """The fast decoder holds copies of the weights: after a `load_state_dict` into the VAE's model it decoded
    with a mix of old and new weights (0.28 off); it is made again from the new ones."""
    ref, fast = _pair(small_sd, torch.float64)
    torch.manual_seed(2)
    z = torch.randn(1, 3, 16, 3, 4)
    before = fast.decode(z)
    other = {k: v * 0.9 if v.is_floating_point() else v for k, v in fast.model.state_dict().items()}
    for vae in (ref, fast):
        vae.model.load_state_dict(other)
    after = fast.decode(z)
    assert not torch.equal(after, before) and torch.equal(after, ref.decode(z))


@pytest.mark.parametrize("chunks", [[3, 3, 1], [1] * 7, [2, 5], [7]])
def test_fast_stream_equals_fast_whole_bitwise(small_sd, chunks, one_thread):
    _, fast = _pair(small_sd, torch.float32)
    torch.manual_seed(2)
    latents = torch.randn(1, sum(chunks), 16, 3, 4)
    whole = fast.decode(latents)
    stream = fast.stream_decoder()
    assert torch.equal(push_in_chunks(stream, latents, chunks), whole)
    assert stream.frames_in == sum(chunks) and stream.frames_out == whole.shape[2]
    again = fast.decode(latents)  # the buffers are re-zeroed for a new video
    assert torch.equal(again, whole)


def test_a_newer_stream_makes_an_older_one_refuse(small_sd):
    _, fast = _pair(small_sd, torch.float32)
    old = fast.stream_decoder()
    old.push(torch.randn(1, 1, 16, 2, 2))
    new = fast.stream_decoder()
    new.push(torch.randn(1, 1, 16, 2, 2))
    with pytest.raises(ModelInputError, match="one video at a time"):
        old.push(torch.randn(1, 1, 16, 2, 2))
    new.push(torch.randn(1, 1, 16, 2, 2))  # the newest goes on


@pytest.mark.parametrize("decoder", ["reference", "fast"])
def test_push_async_off_cuda_is_push(small_sd, decoder):
    vae = WanVAE.from_state_dict(small_sd, decoder=decoder)
    torch.manual_seed(3)
    latents = torch.randn(1, 6, 16, 2, 3)
    plain = vae.stream_decoder()
    want = [plain.push(latents[:, i:i + 3]) for i in (0, 3)]
    overlapped = vae.stream_decoder(overlap=True)
    assert overlapped.stream is None
    pending = [overlapped.push_async(latents[:, i:i + 3]) for i in (0, 3)]
    assert pending[0].done is None
    for p, w in zip(pending, want):
        assert torch.equal(p.get(), w)


def test_decoder_setting_is_checked(small_sd, monkeypatch):
    with pytest.raises(ModelInputError, match="'fastest'"):
        WanVAE.from_state_dict(small_sd, decoder="fastest")
    monkeypatch.setenv("WORKBENCH_VAE_DECODER", "fast")
    assert resolve_decoder("auto") == "fast" and WanVAE.from_state_dict(small_sd).decoder == "fast"
    monkeypatch.setenv("WORKBENCH_VAE_DECODER", "quick")
    with pytest.raises(ModelInputError, match="WORKBENCH_VAE_DECODER 'quick'"):
        resolve_decoder("auto")
    monkeypatch.delenv("WORKBENCH_VAE_DECODER")
    assert resolve_decoder("auto") == "reference"  # no device: the setting is only checked
    # without the variable, auto is the fast decoder on CUDA (half the time on an H200) and diffusers' elsewhere
    assert resolve_decoder("auto", "cuda:1") == "fast" and resolve_decoder("auto", torch.device("cuda")) == "fast"
    assert resolve_decoder("auto", "cpu") == "reference" and WanVAE.from_state_dict(small_sd).decoder == "reference"
    assert resolve_decoder("reference", "cuda") == "reference"  # an explicit choice stays
    monkeypatch.setenv("WORKBENCH_VAE_DECODER", "reference")
    assert resolve_decoder("auto", "cuda") == "reference"


KERNEL_CHECK = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
    from models.wan.triton_vae import rms_silu_into
    from models.wan.vae_fast import _rows
    device = sys.argv[1]
    torch.manual_seed(0)
    for C, images, silu in ((96, False, True), (12, False, False), (24, True, False)):
        norm = WanRMS_norm(C, images=images).to(device)
        with torch.no_grad():
            norm.gamma.copy_(torch.rand_like(norm.gamma) + 0.5)
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            if device == "cpu" and dtype != torch.float32:
                continue  # the interpreter rounds bf16 differently; compiled runs check bf16
            n = norm.to(dtype)
            shape = (2, C, 5, 3, 4) if not images else (3, C, 5, 4)
            fmt = torch.channels_last_3d if not images else torch.channels_last
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            want = F.silu(n(x)) if silu else n(x)
            if images:
                out = torch.full_like(x, float("nan"))
                rms_silu_into(_rows(out), _rows(x), n.gamma, n.scale, silu=silu)
            else:  # into frames 2..6 of a bigger buffer, as the decoder writes a convolution's input
                buf = torch.full((2, C, 7, 3, 4), float("nan"), device=device, dtype=dtype)
                buf = buf.contiguous(memory_format=fmt)
                rms_silu_into(_rows(buf[:, :, 2:]), _rows(x), n.gamma, n.scale, silu=silu)
                assert torch.isnan(buf[:, :, :2]).all(), "wrote outside its frames"
                out = buf[:, :, 2:]
            err = (out.float() - want.float()).abs().max().item()
            assert err <= tol, (C, images, silu, dtype, err)
    # the sums that finish a convolution: the bits of PyTorch's add_ chain (bias added as x.add_(bias) adds it)
    from models.wan.triton_vae import combine_
    from models.wan.vae_fast import _flat
    for dtype in (torch.float32,) + ((torch.bfloat16, torch.float16) if device != "cpu" else ()):
        y, p1, p2, h = (torch.randn(2, 96, 5, 3, 4, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d) for _ in range(4))
        b = torch.randn(96, device=device, dtype=dtype)
        for parts in ([], [p1], [p1, p2]):
            for bias in (None, b):
                for res in (None, h):
                    want = y.clone()
                    for p in parts:
                        want.add_(p)
                    if bias is not None:
                        want.add_(bias.view(-1, 1, 1, 1))
                    if res is not None:
                        want.add_(res)
                    got = y.clone()
                    combine_(_flat(got), [_flat(p) for p in parts], bias, None if res is None else _flat(res))
                    assert torch.equal(got, want), (dtype, len(parts), bias is None, res is None)
        norm = WanRMS_norm(96, images=False).to(device=device, dtype=dtype)
        a, c = torch.empty_like(y), torch.empty_like(y)
        rms_silu_into(_rows(a), _rows(y), norm.gamma, norm.scale, bias=b)
        rms_silu_into(_rows(c), _rows(y + b.view(-1, 1, 1, 1)), norm.gamma, norm.scale)
        assert torch.equal(a, c), dtype
    print("ok")
""")


def test_temporal_taps_compute_the_3d_convolution(small_sd, monkeypatch, one_thread):
    """A 3x3x3 convolution as three 2D taps over frame views of its buffer (what the fast decoder runs on the CPU,
    and on CUDA for 64-127 channels): the reference's function in float64, and a stream still gives a whole
    decode's bits; with the taps off, the fast decoder is the reference's bits."""
    import models.wan.vae_fast as vae_fast

    monkeypatch.setitem(vae_fast.TAPS_CHANNELS, "cpu", range(0))
    ref, fast = _pair(small_sd, torch.float64)
    torch.manual_seed(6)
    z = torch.randn(1, 5, 16, 3, 4)
    want, plain = ref.decode(z), fast.decode(z)
    assert all(c.taps is None for c in fast.fast_decoder().causal_convs())
    monkeypatch.setitem(vae_fast.TAPS_CHANNELS, "cpu", range(10 ** 6))
    _, tapped = _pair(small_sd, torch.float64)
    got = tapped.decode(z)
    convs = tapped.fast_decoder().causal_convs()
    assert sum(c.taps is not None for c in convs) >= 4  # the taps ran (every 3x3x3 one here)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # (the float32 output hides the float64 order)
    torch.testing.assert_close(plain, want, rtol=0, atol=0)
    assert torch.equal(push_in_chunks(tapped.stream_decoder(), z, [2, 3]), got)


def test_triton_norm_kernel_matches_pytorch_in_the_interpreter():
    run_triton_check(KERNEL_CHECK, "cpu")


# ---------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_norm_kernel_matches_pytorch_compiled():
    run_triton_check(KERNEL_CHECK, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("taps", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_decoder_on_cuda_graphs_and_overlap(small_sd, dtype, taps, monkeypatch):
    """Graphs and a side stream give the eager decode's bits, within rounding of the reference; with taps, every
    3x3x3 convolution of this small VAE runs as temporal taps (on the full-size one only the 96-channel ones)."""
    import models.wan.vae_fast as vae_fast

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setitem(vae_fast.TAPS_CHANNELS, "cuda", range(10 ** 6) if taps else range(0))
    ref, fast = _pair(small_sd, dtype, device="cuda")
    torch.manual_seed(4)
    latents = torch.randn(1, 9, 16, 6, 8, device="cuda")
    want = ref.decode(latents)
    eager = fast.fast_decoder()
    eager.graphs = False
    plain = fast.decode(latents)
    eager.graphs = True
    runs = []
    for _ in range(3):  # the first video plans, the second records the graphs, the third replays them
        stream = fast.stream_decoder(overlap=True)
        pending = [stream.push_async(latents[:, i:i + 3]) for i in range(0, 9, 3)]
        runs.append(torch.cat([p.get() for p in pending], dim=2))
    assert fast.fast_decoder()._graphs, "no graph was recorded"
    assert any(c.taps is not None for c in fast.fast_decoder().causal_convs()) == taps
    for run in runs:
        assert torch.equal(run, plain)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(plain, want, rtol=0, atol=tol)
    # the reference decoder on a side stream (generate's default) gives its sequential stream's bits
    seq = ref.stream_decoder()
    sequential = torch.cat([seq.push(latents[:, i:i + 3]) for i in range(0, 9, 3)], dim=2)
    side = ref.stream_decoder(overlap=True)
    pending = [side.push_async(latents[:, i:i + 3]) for i in range(0, 9, 3)]
    assert torch.equal(torch.cat([p.get() for p in pending], dim=2), sequential)

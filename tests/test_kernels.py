"""Exact frame-aggregated attention: the blockwise torch reference and the Triton kernels against a float64
dense softmax (the definitions of `attn_mass` / `attn_key_token` in docs/store.md).

On a machine without CUDA the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is
set below, before the kernel module is imported (the interpreter checks indexing, masking and the frame-edge
logic, not speed). With CUDA the same tests run the compiled kernels on the GPU, plus the `gpu`-marked tests at
the model's frame length.
"""

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the import of workbench.kernels.frame_attention

from conftest import skip_unless_tested_triton, triton_module  # noqa: E402
from models.errors import ModelInputError  # noqa: E402  (the base of WorkbenchError: kernels in models/ raise it)
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.kernels import reference as ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


# ------------------------------------------------------------------------------------------------ helpers


def dense(q, k, v, fsl, allowed=None, scale=None):
    """float64 dense softmax: (out [B, Lq, H, D], mass [B, H, nqf, nkf], tok [B, H, nqf, Lk], lse [B, H, Lq])."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if allowed is not None:
        keep = allowed.cpu().repeat_interleave(fsl, 0).repeat_interleave(fsl, 1)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query frame with no allowed key: all zero
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    tok = p.view(B, H, Lq // fsl, fsl, Lk).sum(3) / fsl
    mass = tok.view(B, H, Lq // fsl, Lk // fsl, fsl).sum(-1)
    return out, mass, tok, lse


def rand_qkv(B, H, D, fsl, nqf, nkf, dtype=torch.float32, seed=0, peak=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nqf * fsl, H, D, generator=g) * peak
    k = torch.randn(B, nkf * fsl, H, D, generator=g)
    v = torch.randn(B, nkf * fsl, H, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def masks(nqf, nkf):
    """allowed masks to test: block-causal (query frame i sees key frames <= offset + i), one with a gap
    (sink + window) and one with a query frame that sees nothing."""
    off = nkf - nqf
    causal = torch.arange(nkf)[None, :] <= (off + torch.arange(nqf))[:, None]
    gap = torch.zeros(nqf, nkf, dtype=torch.bool)
    gap[:, 0] = True
    gap[:, -2:] = True
    empty = causal.clone()
    empty[0] = False
    return {"causal": causal, "gap": gap, "empty_row": empty}


# ----------------------------------------------------------------------------------- reference (no triton)


@pytest.mark.parametrize("B,H,D,fsl,nqf,nkf", [(1, 2, 16, 8, 2, 5), (2, 3, 32, 12, 3, 4)])
@pytest.mark.parametrize("mask", [None, "causal", "gap", "empty_row"])
@pytest.mark.parametrize("block_tokens", [16, 8192])  # 16: several key blocks per query frame
def test_reference_matches_dense_fp64(B, H, D, fsl, nqf, nkf, mask, block_tokens, monkeypatch):
    monkeypatch.setattr(ref, "_KEY_BLOCK_TOKENS", block_tokens)
    q, k, v = rand_qkv(B, H, D, fsl, nqf, nkf, peak=2.0)
    allowed = None if mask is None else masks(nqf, nkf)[mask]
    out_d, mass_d, tok_d, lse_d = dense(q, k, v, fsl, allowed)

    lse = ref.row_lse_reference(q, k, frame_seq_len=fsl, allowed=allowed)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, nqf * fsl)
    assert torch.allclose(lse.double(), lse_d, atol=1e-5, rtol=0, equal_nan=True)

    mass = ref.frame_mass_reference(q, k, frame_seq_len=fsl, allowed=allowed)
    assert mass.dtype == torch.float32 and mass.shape == (B, H, nqf, nkf)
    assert (mass.double() - mass_d).abs().max() < 1e-6

    tok = ref.key_token_mass_reference(q, k, frame_seq_len=fsl, allowed=allowed)
    assert tok.shape == (B, H, nqf, nkf * fsl)
    assert (tok.double() - tok_d).abs().max() < 1e-6

    out, mass2 = ref.frame_attention_reference(q, k, v, frame_seq_len=fsl, allowed=allowed)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out.double() - out_d).abs().max() < 1e-5
    assert torch.equal(mass2, mass)


def test_reference_invariants():
    q, k, v = rand_qkv(1, 2, 16, 10, 3, 6, peak=3.0)
    for name, allowed in [("none", None), *masks(3, 6).items()]:
        mass = ref.frame_mass_reference(q, k, frame_seq_len=10, allowed=allowed)
        rows = mass.sum(-1)  # [B, H, nqf]
        seen = torch.ones(3, dtype=torch.bool) if allowed is None else allowed.any(-1)
        assert torch.allclose(rows[..., seen], torch.ones_like(rows[..., seen]), atol=1e-6), name
        assert torch.all(rows[..., ~seen] == 0), name
        if allowed is not None:
            assert torch.all(mass[..., ~allowed] == 0), name  # disallowed pairs are exactly 0
        tok = ref.key_token_mass_reference(q, k, frame_seq_len=10, allowed=allowed)
        assert torch.allclose(tok.view(1, 2, 3, 6, 10).sum(-1), mass, atol=1e-6), name
    out, _ = ref.frame_attention_reference(q, k, v, frame_seq_len=10, allowed=masks(3, 6)["empty_row"])
    assert torch.all(out[:, :10] == 0)  # the query frame with no allowed key frame


def test_reference_given_lse_matches_float64():
    q, k, _ = rand_qkv(1, 2, 16, 8, 2, 4, dtype=torch.float64)
    _, mass_d, tok_d, lse_d = dense(q, k, k, 8)
    mass = ref.frame_mass_reference(q, k, frame_seq_len=8, lse=lse_d)
    assert mass.dtype == torch.float64 and (mass - mass_d).abs().max() < 1e-12
    tok = ref.key_token_mass_reference(q, k, frame_seq_len=8, lse=lse_d)
    assert (tok - tok_d).abs().max() < 1e-12


def test_model_blockwise_lse_any_length():
    """The model's own LSE pass (used on the CPU when a probe asks for it), for lengths that are not frames."""
    from models.common.attention_kernels import blockwise_lse

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 37, 3, 16, generator=g), torch.randn(2, 101, 3, 16, generator=g)
    lse = blockwise_lse(q, k, block=16)
    want = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 4.0, -1)
    assert (lse.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=(1, 20, 2, 16)), "multiples of frame_seq_len"),
        (dict(k=(1, 30, 2, 16)), "multiples of frame_seq_len"),
        (dict(k=(1, 32, 3, 16)), "does not match"),
        (dict(allowed=torch.ones(3, 4, dtype=torch.bool)), "allowed must be"),
        (dict(allowed=torch.ones(2, 4, dtype=torch.int64)), "allowed must be"),
        (dict(lse=torch.zeros(1, 2, 15)), "lse must be"),
    ],
)
def test_reference_rejects_bad_input(kwargs, match):
    q = torch.zeros(kwargs.get("q", (1, 16, 2, 16)))
    k = torch.zeros(kwargs.get("k", (1, 32, 2, 16)))
    with pytest.raises(WorkbenchError, match=match):
        ref.frame_mass_reference(q, k, frame_seq_len=8, allowed=kwargs.get("allowed"), lse=kwargs.get("lse"))


# ------------------------------------------------------------------------------------------ Triton kernels


@pytest.fixture(scope="module")
def fa():
    return triton_module("workbench.kernels.frame_attention", "models.common.triton_attention_plan",
                         "models.common.triton_attention_kernels", "models.common.triton_attention")


def tma_usable(k, v):
    from models.common.triton_common import tma_usable

    return tma_usable(k, v)


# (B, H, D, fsl, nqf, nkf, BLOCK_M, BLOCK_N, use_tma, dtype)
FUSED_CASES = [
    (1, 2, 16, 24, 2, 3, 32, 16, False, torch.float32),  # fsl > BLOCK_N, not a multiple; Lq % BLOCK_M != 0
    (1, 2, 32, 8, 3, 5, 16, 32, False, torch.float32),  # several key frames per tile
    (2, 2, 32, 20, 3, 4, 16, 16, True, torch.float32),  # TMA descriptors over [B * Lk, H * D], B = 2
    (1, 2, 32, 20, 2, 7, 32, 16, False, torch.bfloat16),
    (1, 2, 32, 12, 3, 5, 16, 16, False, torch.float16),
    (1, 1, 16, 4, 2, 40, 16, 16, False, torch.float32),  # > 32 key frames: two epilogue chunks
]


def _ids(case):
    B, H, D, fsl, nqf, nkf, bm, bn, tma, dt = case
    return f"B{B}-D{D}-fsl{fsl}-{nqf}x{nkf}-bm{bm}bn{bn}-{'tma' if tma else 'ptr'}-{str(dt)[6:]}"


def _tol(dtype):
    # (out, mass): the interpreter multiplies bf16/fp16 tiles exactly in fp32, a GPU with fp32 accumulation
    return (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 1e-4)


@pytest.mark.parametrize("case", FUSED_CASES, ids=_ids)
def test_fused_matches_dense(fa, case):
    B, H, D, fsl, nqf, nkf, bm, bn, tma, dtype = case
    q, k, v = (t.to(DEV) for t in rand_qkv(B, H, D, fsl, nqf, nkf, dtype=dtype, peak=2.0))
    use_tma = tma and (not CUDA or tma_usable(k, v))  # on a GPU before sm90: pointer loads
    out, mass = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, config={"BLOCK_M": bm, "BLOCK_N": bn},
                                 use_tma=use_tma)
    assert out.dtype == dtype and out.shape == q.shape
    assert mass.dtype == torch.float32 and mass.shape == (B, H, nqf, nkf)
    out_d, mass_d, _, _ = dense(q, k, v, fsl)
    tol_out, tol_mass = _tol(dtype)
    assert (out.double().cpu() - out_d).abs().max() < tol_out
    assert (mass.double().cpu() - mass_d).abs().max() < tol_mass
    assert torch.allclose(mass.sum(-1), torch.ones_like(mass.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("split,n_full,bm", [(2, 3, 16), (3, 0, 16), (5, 4, 16), (1, None, 16), (2, 1, 64)])
def test_fused_split_segments(fa, split, n_full, bm):
    """Tiles split into segments of whole key frames (then merged) give the unsplit result.
    2 x 2 x ceil(30 / 16) = 8 tiles (4 of 64 rows); the last ones from n_full on are split (with 64-row tiles
    the merge runs 2 programs of 32 rows per tile)."""
    B, H, D, fsl, nqf, nkf = 2, 2, 16, 10, 3, 5
    q, k, v = (t.to(DEV) for t in rand_qkv(B, H, D, fsl, nqf, nkf, peak=6.0, seed=7))
    cfg = {"BLOCK_M": bm, "BLOCK_N": 16, "split": split}
    if n_full is not None:
        cfg["n_full"] = n_full
    out, mass = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, config=cfg)
    out_d, mass_d, _, _ = dense(q, k, v, fsl)
    assert (out.double().cpu() - out_d).abs().max() < 1e-5
    assert (mass.double().cpu() - mass_d).abs().max() < 1e-6
    out1, _ = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, config={"BLOCK_M": 16, "BLOCK_N": 16, "split": 1})
    assert (out - out1).abs().max() < 1e-5


@pytest.mark.parametrize("split", [1, 3])
def test_fused_frame_means(fa, split):
    """The per-frame mean vectors of q and k that the fused kernel makes for attn_logit equal the float64 means,
    also when tiles run split (the first segment of query block j averages frame j)."""
    B, H, D, fsl, nqf, nkf = 2, 2, 16, 20, 2, 5  # 3 query blocks of 16 rows per head: fewer than the 5 key frames
    q, k, v = (t.to(DEV) for t in rand_qkv(B, H, D, fsl, nqf, nkf, seed=9))
    out, mass, qm, km = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, frame_means=True,
                                         config={"BLOCK_M": 16, "BLOCK_N": 16, "split": split, "n_full": 6})
    want_q = q.double().cpu().view(B, nqf, fsl, H, D).mean(2).permute(0, 2, 1, 3)
    want_k = k.double().cpu().view(B, nkf, fsl, H, D).mean(2).permute(0, 2, 1, 3)
    assert qm.shape == (B, H, nqf, D) and km.shape == (B, H, nkf, D)
    assert (qm.double().cpu() - want_q).abs().max() < 1e-6
    assert (km.double().cpu() - want_k).abs().max() < 1e-6


@pytest.mark.parametrize("tile", [None, dict(block_r=32, sub=16, block_c=32, num_warps=2), dict(block_r=64, sub=64,
                                                                                                block_c=512)])
def test_frame_means_kernels_match_float64(fa, tile):
    """frame_means_into (models/common/triton_attention.py: the Gluon path's frame means with config MEANS=
    "triton"): every frame's mean vector equals float64's, for frames longer than its row block and not a
    multiple of it, and for a view of a longer buffer (a KV cache's: batch stride > L * H * D); for the default
    tiling, one with several sub-blocks a row block and column blocks spanning heads (32 of 48 columns does not
    divide: 16 are used), and one wider than all columns."""
    from models.common.triton_attention import frame_means_into

    B, H, D, fsl, nf = 2, 3, 16, 70, 3
    dtype = torch.bfloat16 if CUDA else torch.float32
    buf = torch.randn(B, 5 * fsl, H, D, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    x = buf[:, fsl:(nf + 1) * fsl]
    out = frame_means_into(x, fsl, torch.full((B, H, nf, D), float("nan"), device=DEV), tile)
    want = x.double().cpu().reshape(B, nf, fsl, H, D).mean(2).transpose(1, 2)
    assert (out.double().cpu() - want).abs().max() < 1e-6
    for bad in (dict(block_r=48), dict(sub=128, block_r=64), dict(rows=64), dict(num_warps=0)):
        with pytest.raises(ModelInputError, match="allowed keys are"):
            frame_means_into(x, fsl, out, bad)


def test_frame_means_of_several_tensors_in_one_pass_are_the_bits_of_each_alone(fa):
    """frame_means_many_into (a capture's q and its new keys, two to a launch): every job's frames land in its own
    output's slots from its first_frame, bitwise what frame_means_into gives each alone, for tensors of other
    batch strides and frame counts, and an odd number of jobs; a bad job is refused before any output is written."""
    from models.common.triton_attention import frame_means_into, frame_means_many_into

    B, H, D, fsl = 2, 3, 16, 70
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, 2 * fsl, H, D, generator=g).to(DEV, dtype)
    cache = torch.randn(B, 6 * fsl, H, D, generator=g).to(DEV, dtype)
    k_new, x3 = cache[:, 3 * fsl : 6 * fsl], torch.randn(B, fsl, H, D, generator=g).to(DEV, dtype)
    outs = [torch.full((B, H, n, D), float("nan"), device=DEV) for n in (2, 7, 1)]
    frame_means_many_into([(q, outs[0], 0), (k_new, outs[1], 4), (x3, outs[2], 0)], fsl)
    alone = [frame_means_into(x, fsl, torch.full_like(o, float("nan")), first_frame=f)
             for x, o, f in ((q, outs[0], 0), (k_new, outs[1], 4), (x3, outs[2], 0))]
    for got, want in zip(outs, alone):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert outs[1][:, :, :4].isnan().all() and not outs[1][:, :, 4:].isnan().any()
    fresh = [torch.full_like(o, float("nan")) for o in outs[:2]]
    with pytest.raises(ModelInputError, match="allowed is a contiguous float32"):
        frame_means_many_into([(q, fresh[0], 0), (k_new, fresh[1], 5)], fsl)  # 3 frames from slot 5 of 7
    with pytest.raises(ModelInputError, match="allowed is a contiguous float32"):
        frame_means_many_into([(q, fresh[0], 0), (k_new, fresh[1], -1)], fsl)  # a slot before the output's first
    other = torch.float16  # (a dtype the kernels take, beside q of another)
    with pytest.raises(ModelInputError, match="allowed are tensors of one dtype"):
        frame_means_many_into([(q, fresh[0], 0), (k_new.to(other), fresh[1], 4)], fsl)
    assert fresh[0].isnan().all() and fresh[1].isnan().all()


@pytest.mark.parametrize("split", [1, 2])
def test_fused_into_writes_the_buffer_cells(fa, split):
    """frame_forward_into_store writes attn_mass and attn_logit (float64 references) into the given cells of
    a capture buffer view and nothing else; its output is the fused forward's."""
    B, H, D, fsl, nqf, nkf, F = 1, 2, 16, 12, 2, 4, 6
    q, k, v = (t.to(DEV) for t in rand_qkv(B, H, D, fsl, nqf, nkf, peak=2.0, seed=10))
    buf = torch.full((B, 2, 3, H, F, F), float("nan"), device=DEV)  # [B, step, layer, head, query f, key f]
    logit_buf = torch.full_like(buf, float("nan"))
    qidx = torch.tensor([3, 4], device=DEV)
    kidx = torch.tensor([0, 2, 3, 4], device=DEV)  # a sink and a window: not contiguous
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "split": split, "n_full": 2}
    out = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, config=cfg, store=dict(
        mass_out=buf[:, 1, 2], logit_out=logit_buf[:, 1, 2], query_index=qidx, key_index=kidx))[0]
    out_d, mass_d, _, _ = dense(q, k, v, fsl)
    assert (out.double().cpu() - out_d).abs().max() < 1e-5
    cells = buf[:, 1, 2][:, :, qidx[:, None], kidx[None, :]]
    assert (cells.double().cpu() - mass_d).abs().max() < 1e-6
    qm = q.double().cpu().view(B, nqf, fsl, H, D).mean(2).permute(0, 2, 1, 3)
    km = k.double().cpu().view(B, nkf, fsl, H, D).mean(2).permute(0, 2, 1, 3)
    want = qm @ km.transpose(-1, -2) / math.sqrt(D)
    assert (logit_buf[:, 1, 2][:, :, qidx[:, None], kidx[None, :]].double().cpu() - want).abs().max() < 1e-5
    assert int((~buf.isnan()).sum()) == B * H * nqf * nkf  # nothing else written
    assert int((~logit_buf.isnan()).sum()) == B * H * nqf * nkf
    with pytest.raises(WorkbenchError, match="query_index"):
        fa.frame_forward_into_store(q, k, v, frame_seq_len=fsl, mass_out=buf[:, 0, 0], query_index=qidx[:1],
                                      key_index=kidx)
    with pytest.raises(WorkbenchError, match="key_index must be an integer tensor"):
        fa.frame_forward_into_store(q, k, v, frame_seq_len=fsl, mass_out=buf[:, 0, 0], query_index=qidx,
                                      key_index=kidx.float())
    assert int((~buf.isnan()).sum()) == B * H * nqf * nkf  # refused before any work: nothing more written


def test_split_plan_fills_the_last_wave():
    pytest.importorskip("triton")  # (the kernels extra)
    from models.common.triton_attention_plan import split_plan

    assert split_plan(264, 132, 21, 12.2) == (264, 1)  # whole waves: nothing to split
    n_full, split = split_plan(444, 132, 21, 12.2)  # the 1.3B call: 12 heads x 37 query blocks on 132 SMs
    assert n_full == 396 and 2 <= split <= 16
    assert split_plan(444, 132, 1, 12.2) == (444, 1)  # one key frame: no segment boundary
    n_full, split = split_plan(30, 132, 6, 12.2)  # fewer tiles than SMs: split to fill the GPU
    assert n_full == 0 and split > 1 and 30 * split <= 4 * 132


@pytest.mark.parametrize("mask", ["causal", "gap", "empty_row"])
@pytest.mark.parametrize("fsl,bm,bn", [(8, 16, 16), (20, 16, 32)])  # query blocks spanning two query frames
def test_fused_with_allowed_mask(fa, mask, fsl, bm, bn):
    nqf, nkf = 3, 6
    allowed = masks(nqf, nkf)[mask]
    q, k, v = (t.to(DEV) for t in rand_qkv(1, 2, 16, fsl, nqf, nkf, peak=2.0, seed=3))
    out, mass = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, allowed=allowed,
                                         config={"BLOCK_M": bm, "BLOCK_N": bn})
    out_d, mass_d, _, _ = dense(q, k, v, fsl, allowed)
    assert (out.double().cpu() - out_d).abs().max() < 1e-5
    assert (mass.double().cpu() - mass_d).abs().max() < 1e-6
    assert torch.all(mass.cpu()[..., ~allowed] == 0)


def test_fused_many_key_frames_with_mask(fa):
    nqf, nkf, fsl = 2, 40, 4  # > 32 key frames: two epilogue chunks and a 64-wide key-range search
    allowed = masks(nqf, nkf)["gap"]
    allowed[1, 10:20] = True
    q, k, v = (t.to(DEV) for t in rand_qkv(1, 1, 16, fsl, nqf, nkf, peak=2.0, seed=4))
    out, mass = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, allowed=allowed,
                                         config={"BLOCK_M": 16, "BLOCK_N": 16})
    out_d, mass_d, _, _ = dense(q, k, v, fsl, allowed)
    assert (out.double().cpu() - out_d).abs().max() < 1e-5
    assert (mass.double().cpu() - mass_d).abs().max() < 1e-6


def test_fused_public_function_and_no_mass_variant(fa):
    q, k, v = (t.to(DEV) for t in rand_qkv(1, 2, 16, 12, 2, 3, seed=5))
    out, mass = fa.frame_forward_with_stats(q, k, v, frame_seq_len=12)  # default config (autotuned on a GPU)
    out0, mass0 = fa._launch_frame_forward(q, k, v, frame_seq_len=12, with_mass=False,
                                   config=None if CUDA else {"BLOCK_M": 16, "BLOCK_N": 16})
    assert mass0 is None
    out_d, mass_d, _, _ = dense(q, k, v, 12)
    assert (out.double().cpu() - out_d).abs().max() < 1e-5
    assert (out0.double().cpu() - out_d).abs().max() < 1e-5
    assert (mass.double().cpu() - mass_d).abs().max() < 1e-6


@pytest.mark.parametrize("fsl,nqf,nkf,bm,bn", [(24, 2, 3, 16, 16), (8, 3, 5, 32, 16), (12, 3, 4, 16, 32)])
@pytest.mark.parametrize("mask", [None, "causal", "empty_row"])
def test_from_lse_matches_dense(fa, fsl, nqf, nkf, bm, bn, mask):
    allowed = None if mask is None else masks(nqf, nkf)[mask]
    q, k, v = (t.to(DEV) for t in rand_qkv(1, 2, 16, fsl, nqf, nkf, peak=2.0, seed=7))
    _, mass_d, tok_d, lse_d = dense(q, k, v, fsl, allowed)
    lse = lse_d.float().to(DEV)
    tok = fa._launch_key_token(q, k, lse, frame_seq_len=fsl, scale=0.25, allowed=allowed,
                               config={"BLOCK_M": bm, "BLOCK_N": bn})
    assert tok.shape == (1, 2, nqf, nkf * fsl) and tok.dtype == torch.float32
    assert (tok.double().cpu() - tok_d).abs().max() < 1e-6
    mass = fa.frame_mass_from_lse(q, k, lse, frame_seq_len=fsl, scale=0.25, allowed=allowed)
    assert (mass.double().cpu() - mass_d).abs().max() < 1e-6
    tok2 = fa.key_token_mass_from_lse(q, k, lse, frame_seq_len=fsl, scale=0.25, allowed=allowed)
    assert (tok2.double().cpu() - tok_d).abs().max() < 1e-6


def test_from_lse_bf16(fa):
    q, k, v = (t.to(DEV) for t in rand_qkv(1, 2, 32, 20, 2, 4, dtype=torch.bfloat16, seed=9))
    _, mass_d, _, lse_d = dense(q, k, v, 20)
    mass = fa.frame_mass_from_lse(q, k, lse_d.float().to(DEV), frame_seq_len=20, scale=32**-0.5)
    assert (mass.double().cpu() - mass_d).abs().max() < 1e-4


def test_lse_from_sdpa(fa):
    q, k, v = (t.to(DEV) for t in rand_qkv(1, 2, 32, 10, 3, 5, dtype=torch.bfloat16 if CUDA else torch.float32))
    out, lse = fa.lse_from_sdpa(q, k, v, 32**-0.5)
    out_d, _, _, lse_d = dense(q, k, v, 10)
    assert out.shape == q.shape and lse.shape == (1, 2, 30) and lse.dtype == torch.float32
    assert (lse.double().cpu() - lse_d).abs().max() < (2e-2 if CUDA else 1e-5)
    assert (out.double().cpu() - out_d).abs().max() < (2e-2 if CUDA else 1e-5)


def test_kernels_reject_bad_input(fa):
    q, k, v = rand_qkv(1, 2, 16, 8, 2, 3)
    with pytest.raises(ModelInputError, match="bfloat16, float16 or float32"):
        fa.frame_forward_with_stats(q.double(), k.double(), v.double(), frame_seq_len=8)
    q24, k24 = torch.zeros(1, 16, 2, 24), torch.zeros(1, 24, 2, 24)
    with pytest.raises(ModelInputError, match="head_dim a power of two"):
        fa.frame_forward_with_stats(q24, k24, k24, frame_seq_len=8)
    with pytest.raises(WorkbenchError, match="multiples of frame_seq_len"):
        fa.frame_mass_from_lse(q, k, torch.zeros(1, 2, 16), frame_seq_len=5, scale=0.25)
    from models.common.triton_attention import frame_attention

    with pytest.raises(ModelInputError, match="MEANS='fast'.*'torch' and 'triton'"):
        dt = torch.bfloat16 if CUDA else torch.float32
        frame_attention(q.to(DEV, dt), k.to(DEV, dt), v.to(DEV, dt), frame_seq_len=8, frame_means=True,
                        config={"MEANS": "fast"})


# ----------------------------------------------------------------------------- GPU: the model's frame length


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [None, "causal"])
def test_gpu_model_shapes(fa, mask):
    fsl, nqf, nkf = 1560, 3, 7
    allowed = None if mask is None else masks(nqf, nkf)[mask]
    q, k, v = (t.to("cuda") for t in rand_qkv(1, 2, 128, fsl, nqf, nkf, dtype=torch.bfloat16, seed=11))
    out, mass = fa.frame_forward_with_stats(q, k, v, frame_seq_len=fsl, allowed=allowed)
    want = ref.frame_mass_reference(q, k, frame_seq_len=fsl, allowed=allowed)
    assert (mass - want).abs().max() < 1e-3
    # 2 heads x 37 query blocks fill less than a wave of 132 SMs: unmasked calls run split into segments
    out1, mass1 = fa._launch_frame_forward(q, k, v, frame_seq_len=fsl, allowed=allowed, config={"split": 1})
    assert (mass - mass1).abs().max() < 1e-5 and (out.float() - out1.float()).abs().max() < 2e-2
    out_r, _ = ref.frame_attention_reference(q, k, v, frame_seq_len=fsl, allowed=allowed)
    assert (out.float() - out_r.float()).abs().max() < 2e-2
    if allowed is None:
        lse_out, lse = fa.lse_from_sdpa(q, k, v, 128**-0.5)
        assert (out.float() - lse_out.float()).abs().max() < 2e-2
        mass_b = fa.frame_mass_from_lse(q, k, lse, frame_seq_len=fsl, scale=128**-0.5)
        assert (mass_b - want).abs().max() < 1e-3


# ------------------------------------------------------------------ the model's own Triton kernel


@pytest.mark.parametrize("split", [1, 2])
def test_triton_forward_output_does_not_depend_on_the_extras(fa, split):
    """models.common.triton_attention.frame_attention: asking for the row masses, the frame means or the log-sum-exp
    leaves the output's bits unchanged (the capture of a model on this kernel changes nothing), with whole and
    split tiles; the LSE equals float64."""
    from models.common.triton_attention import frame_attention

    fsl = 12
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v = (t.to(DEV) for t in rand_qkv(1, 2, 16, fsl, 2, 5, dtype=dtype, peak=2.0))
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "split": split, "n_full": 1}
    base = frame_attention(q, k, v, frame_seq_len=fsl, config=cfg)
    assert base.row_mass is None and base.lse is None and base.q_means is None
    for extras in (dict(with_mass=True), dict(frame_means=True), dict(with_lse=True),
                   dict(with_mass=True, frame_means=True, with_lse=True)):
        r = frame_attention(q, k, v, frame_seq_len=fsl, config=cfg, **extras)
        assert torch.equal(r.out, base.out), extras
    out_d, _, _, lse_d = dense(q, k, v, fsl)
    assert (r.lse.double().cpu() - lse_d).abs().max() < (1e-3 if CUDA else 1e-5)
    assert (base.out.double().cpu() - out_d).abs().max() < (2e-2 if CUDA else 1e-5)


def _ws_config_or_skip():
    """The opt-in warp-specialised variant's config here: tiny blocks in the interpreter; on a GPU the first
    sweep candidate, which needs TMA (sm90+)."""
    if not CUDA:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "WS": True}
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the WS variant needs TMA (sm90+)")
    from models.common.triton_attention import WS_GPU_ENV

    if os.environ.get(WS_GPU_ENV) != "1":
        pytest.skip(f"WS on a GPU is experimental (wrong outputs on the H200, bench/RESULTS.md 2026-12-02): "
                    f"set {WS_GPU_ENV}=1")
    from models.common.triton_attention_plan import FUSED_WS_CANDIDATES

    return dict(FUSED_WS_CANDIDATES[0])


def test_scratch_from_torch_is_scoped_to_the_launch(fa):
    """The WS launch's global scratch (its in-kernel q descriptor) comes from torch inside the context only: the
    allocator set before is back after it."""
    from triton.runtime import _allocation

    from models.common.triton_common import scratch_from_torch

    before = _allocation._allocator.get()
    with scratch_from_torch(torch.device("cpu")):
        buf = _allocation._allocator.get()(384, 128, None)
        assert buf.dtype == torch.int8 and buf.numel() == 384 and buf.device.type == "cpu"
    assert _allocation._allocator.get() is before


@pytest.mark.parametrize("split", [1, 3])
def test_warp_specialised_variant_matches_dense(fa, split):
    """config WS=True (models/common/triton_attention.py: q through TMA, every key tile masked at the sweep's end,
    predicated stores after the loop): output and LSE equal float64, with whole and split tiles, for two batches
    whose last query block runs past Lq (rows the batch's own q descriptor zero-fills, never stored)."""
    from models.common.triton_attention import frame_attention

    cfg = dict(_ws_config_or_skip(), split=split, n_full=3)
    B, H, D, fsl, nqf, nkf = (2, 2, 16, 12, 2, 5) if not CUDA else (2, 2, 128, 100, 3, 5)
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v = (t.to(DEV) for t in rand_qkv(B, H, D, fsl, nqf, nkf, dtype=dtype, peak=2.0, seed=5))
    r = frame_attention(q, k, v, frame_seq_len=fsl, with_lse=True, use_tma=True, config=cfg)
    out_d, _, _, lse_d = dense(q, k, v, fsl)
    assert (r.out.double().cpu() - out_d).abs().max() < (2e-2 if CUDA else 1e-5)
    assert (r.lse.double().cpu() - lse_d).abs().max() < (1e-3 if CUDA else 1e-5)
    plain = frame_attention(q, k, v, frame_seq_len=fsl, use_tma=True, config=cfg).out
    assert torch.equal(plain, r.out)  # the LSE leaves the output's bits unchanged here too


def test_warp_specialised_variant_refuses_what_it_does_not_compute(fa):
    from models.common.triton_attention import frame_attention

    cfg = _ws_config_or_skip()
    q, k, v = rand_qkv(1, 1, 16, 4, 1, 2)
    for kwargs, what in ((dict(with_mass=True), "with_mass=True"), (dict(frame_means=True), "frame_means=True"),
                         (dict(allowed=torch.ones(1, 2, dtype=torch.bool)), "allowed=a mask"),
                         (dict(use_tma=False), "use_tma=False")):
        with pytest.raises(ModelInputError, match=what):
            frame_attention(q.to(DEV), k.to(DEV), v.to(DEV), frame_seq_len=4, config=cfg,
                            **{"use_tma": True, **kwargs})


def test_fused_store_reads_kept_key_means(fa):
    """frame_forward_into_store with key_means: the fresh runs' means land in their absolute frames' slots, bitwise
    what one pass over all of k gives those frames (frame_means_into's per-frame sums); the other slots are read
    as kept (attn_logit from them, float64 reference), never written; bad runs or buffers are refused before any
    work."""
    from models.common.triton_attention import frame_means_into

    B, H, D, fsl, nqf, nkf, F = 2, 2, 16, 12, 2, 4, 6
    q, k, v = (t.to(DEV) for t in rand_qkv(B, H, D, fsl, nqf, nkf, seed=11))
    qidx, kidx = torch.tensor([3, 4], device=DEV), torch.tensor([0, 2, 3, 4], device=DEV)
    kept = torch.randn(B, H, F, D, generator=torch.Generator().manual_seed(1)).to(DEV)  # frames 0, 2: "kept"
    before = kept.clone()
    mass, logit = (torch.full((B, H, F, F), float("nan"), device=DEV) for _ in range(2))
    out = fa.frame_forward_into_store(q, k, v, frame_seq_len=fsl, mass_out=mass, logit_out=logit, query_index=qidx,
                                      key_index=kidx, key_means=kept, fresh=[(2, 4, 3)])  # positions 2-3: frames 3-4
    everything = frame_means_into(k, fsl, torch.empty(B, H, nkf, D, device=DEV))
    assert torch.equal(kept[:, :, 3:5], everything[:, :, 2:4])
    assert torch.equal(kept[:, :, [0, 1, 2, 5]], before[:, :, [0, 1, 2, 5]])
    qm = q.double().cpu().view(B, nqf, fsl, H, D).mean(2).permute(0, 2, 1, 3)
    km = kept.double().cpu()[:, :, [0, 2, 3, 4]]
    want = qm @ km.transpose(-1, -2) / math.sqrt(D)
    assert (logit[:, :, qidx[:, None], kidx[None, :]].double().cpu() - want).abs().max() < 1e-5
    assert (out.double().cpu() - dense(q, k, v, fsl)[0]).abs().max() < (2e-2 if CUDA else 1e-5)
    assert int((~logit.isnan()).sum()) == B * H * nqf * nkf
    for bad_runs, bad_means in (([(2, 5, 3)], kept), ([(1, 3, 5)], kept), ([(2, 4, 3)], kept[:, :, :4]),
                                ([(2, 4, 3)], kept.transpose(2, 3)), ([(2, 4, 3)], kept.double())):
        with pytest.raises(WorkbenchError, match="fresh key-frame run|key_means must be"):
            fa.frame_forward_into_store(q, k, v, frame_seq_len=fsl, logit_out=torch.full_like(logit, float("nan")),
                                        query_index=qidx, key_index=kidx, key_means=bad_means, fresh=bad_runs)
    assert torch.equal(kept, torch.cat([before[:, :, :3], everything[:, :, 2:4], before[:, :, 5:]], 2))
    with pytest.raises(ModelInputError, match="allowed is a contiguous float32"):
        frame_means_into(k, fsl, kept, first_frame=3)  # 4 frames from slot 3 of 6


def test_model_on_triton_kernel_fused_capture_changes_nothing(fa, monkeypatch):
    """A tiny causal model with attention_kernel="triton" (run here by the interpreter or the GPU): a fused
    capture of every head and an exact capture both leave the rollout bitwise as the plain run, and the stored
    statistics equal the float64 reference of the q, k each call saw (sink + window eviction: the third chunk
    already evicts). The fused probe averages only the keys each call wrote (the chunk's 3 frames; the other
    frames' means are kept from the call that wrote them, across the eviction's moves)."""
    import numpy as np
    from attention_reference import AttendRecorder, dense_frame_stats, expected_key_frames
    from conftest import tiny_model
    from models.common.rollout import causal_few_step
    from models.common.scheduler import FlowMatchScheduler
    from workbench.capture import CaptureSpec, Geometry, StatsProbe
    from workbench.hooks import attach

    dtype = torch.bfloat16 if CUDA else torch.float32
    # (2 heads, not the preset's 4: the interpreter runs a kernel's programs one by one, and each head has its own)
    model = tiny_model(local_attn_size=6, sink_size=1, num_heads=2).to(DEV).to(dtype)
    model.attention_kernel = "triton"
    cfg, frames, fsl, nfpb, steps = model.config, 9, 6, 3, 2  # a denoising step and the context pass (which
    # writes the chunk's keys again: their means are made anew)

    def rollout(*probes):
        g = torch.Generator(device=DEV).manual_seed(0)
        noise = torch.randn(1, frames, 16, 4, 6, generator=g, device=DEV).to(dtype)
        ctx = torch.randn(1, cfg.text_len, 32, generator=g, device=DEV).to(dtype)
        s = FlowMatchScheduler(5.0)
        with attach(model, *probes):
            return causal_few_step(model, noise, ctx, timesteps=s.warp([1000]), scheduler=s, generator=g)

    spec = CaptureSpec(layers=(0, 1), heads=tuple(range(cfg.num_heads)), steps=tuple(range(steps)))
    geo = Geometry(1, frames, fsl, cfg.text_len)
    plain = rollout()
    fused = StatsProbe(spec, geo, DEV, mode="fused", kernel="triton")
    rec = AttendRecorder(model, [0, 1])
    averaged, means_into = [], fa.frame_means_many_into  # [(frames, first_frame) of q, of k's runs] every call

    def spy(jobs, frame_seq_len, tile=None):
        averaged.append([(x.shape[1] // frame_seq_len, first) for x, _, first in jobs])
        return means_into(jobs, frame_seq_len, tile)

    monkeypatch.setattr(fa, "frame_means_many_into", spy)
    assert torch.equal(rollout(fused), plain)
    monkeypatch.undo()
    rec.remove()
    assert fused.last_path == "fused-store"  # the kernel wrote the cells itself
    # q (all its frames, from slot 0) and the new chunk's keys (their absolute frames), in one pass a call
    assert sorted(averaged) == sorted([(nfpb, 0), (nfpb, c * nfpb)] for c in range(frames // nfpb)
                                      for _ in range(2 * steps))
    exact = StatsProbe(spec, geo, DEV, mode="exact", kernel="triton")
    assert torch.equal(rollout(exact), plain)
    tol = 1e-3 if CUDA else 1e-5
    for layer, calls in rec.records.items():
        for visit, (q, k, _call) in enumerate(calls):
            chunk, step = divmod(visit, steps)
            qf = np.arange(chunk * nfpb, (chunk + 1) * nfpb)
            kf = np.array(expected_key_frames(chunk, nfpb, 6, 1))
            mass, logit = dense_frame_stats(q, k, fsl)
            for name, want in (("attn_mass", mass), ("attn_logit", logit)):
                for probe in (fused, exact):
                    got = probe.results()[name][0, step, layer][:, qf[:, None], kf[None, :]]
                    scale = 1.0 if name == "attn_mass" else max(1.0, float(want.abs().max()))
                    assert np.abs(got - want[0].cpu().numpy()).max() < tol * scale, (name, layer, visit, probe.mode)


def test_kept_key_means_follow_rerotation_and_in_place_edits(fa, monkeypatch, one_thread):
    """The fused probe keeps each key frame's mean between calls (workbench/capture.py `_kept_key_means`). Under a
    deep-sink policy (the sink's keys re-rotated to new RoPE positions) and a hook that edits the sink's keys in
    the KV cache in place at every chunk's context pass, attn_logit still equals the float64 reference of the
    q, k each call saw; with the cache's and the call's stamp guards switched off it does not (the check can
    fail)."""
    import numpy as np
    from attention_reference import AttendRecorder, dense_frame_stats
    from conftest import tiny_model
    from models.common.kv_cache import KeyStamps, KVCache
    from models.common.rollout import causal_few_step
    from models.common.scheduler import FlowMatchScheduler
    from workbench.capture import CaptureSpec, Geometry, StatsProbe
    from workbench.hooks import attach
    from workbench.kv_policies import DeepSink

    dtype = torch.bfloat16 if CUDA else torch.float32
    model = tiny_model(num_heads=2).to(DEV).to(dtype)  # (2 heads: the interpreter's time goes with the programs)
    model.attention_kernel = "triton"
    cfg, frames, fsl, steps = model.config, 6, 6, 2  # a denoising step and the context pass

    def edit_sink(module, args):  # each chunk's context pass scales the sink frame's keys in the cache
        q, k, _v, call = args[:4]
        if call.labels.step == 1 and call.key_frames[0] == 0:
            k[:, :fsl] *= 1.5

    def rollout():
        g = torch.Generator(device=DEV).manual_seed(0)
        noise = torch.randn(1, frames, 16, 4, 6, generator=g, device=DEV).to(dtype)
        ctx = torch.randn(1, cfg.text_len, 32, generator=g, device=DEV).to(dtype)
        s = FlowMatchScheduler(5.0)
        probe = StatsProbe(CaptureSpec(layers=(0, 1), heads=tuple(range(cfg.num_heads)), steps=tuple(range(steps))),
                           Geometry(1, frames, fsl, cfg.text_len), DEV, mode="fused", kernel="triton")
        hook = model.blocks[0].self_attn.attend.register_forward_pre_hook(edit_sink)
        rec = AttendRecorder(model, [0, 1])  # after the hook: it records the edited keys
        with attach(model, probe):
            causal_few_step(model, noise, ctx, timesteps=s.warp([1000]), scheduler=s, generator=g,
                            cache_policy=DeepSink(5, 1))
        hook.remove()
        rec.remove()
        assert probe.last_path == "fused-store"
        worst, moved = 0.0, False
        for layer, calls in rec.records.items():
            for q, k, call in calls:
                moved |= call.key_frames[0] == 0 and len(call.key_frames) > 1 and call.key_frames[1] > 1
                _, logit = dense_frame_stats(q, k, fsl)
                got = probe.results()["attn_logit"][0, call.labels.step, layer][
                    :, np.array(call.query_frames)[:, None], np.array(call.key_frames)[None, :]]
                worst = max(worst, float(np.abs(got - logit[0].cpu().numpy()).max() / logit.abs().max()))
        assert moved  # the policy evicted and re-aligned the sink
        return worst

    tol = 1e-3 if CUDA else 1e-5
    assert rollout() < tol
    monkeypatch.setattr(KVCache, "_check_foreign_writes", lambda self: None)
    monkeypatch.setattr(KeyStamps, "valid_for", lambda self, k: True)
    assert rollout() > 10 * tol


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("nkf", [3, 12, 21])
def test_gpu_triton_kernel_output_is_the_same_for_every_variant_at_rollout_shapes(fa, nkf):
    """At the 1.3B rollout's call shapes (12 heads, 3 query frames, 3/12/21 key frames of 1560 tokens, the
    GPU's own split plan): the plain forward, the one with row masses and frame means, the one with LSE, and
    the capture store path all return the same output bits; the store path's cells equal the reference."""
    from models.common.triton_attention import frame_attention

    fsl, nqf, heads = 1560, 3, 12
    q, k, v = (t.to("cuda") for t in rand_qkv(1, heads, 128, fsl, nqf, nkf, dtype=torch.bfloat16, seed=nkf))
    base = frame_attention(q, k, v, frame_seq_len=fsl).out
    for extras in (dict(with_mass=True, frame_means=True), dict(with_lse=True), dict(with_mass=True)):
        assert torch.equal(frame_attention(q, k, v, frame_seq_len=fsl, **extras).out, base), extras
    mass_out = torch.full((1, heads, 21, 21), float("nan"), device="cuda")
    logit_out = torch.full_like(mass_out, float("nan"))
    qi, ki = torch.arange(nqf, device="cuda") + 21 - nqf, torch.arange(nkf, device="cuda") + 21 - nkf
    out = fa.frame_forward_into_store(q, k, v, frame_seq_len=fsl, mass_out=mass_out, logit_out=logit_out,
                                        query_index=qi, key_index=ki)
    assert torch.equal(out, base)
    want = ref.frame_mass_reference(q, k, frame_seq_len=fsl)
    assert (mass_out[:, :, 21 - nqf:, 21 - nkf:] - want).abs().max() < 1e-3
    assert int(mass_out.isnan().sum()) == heads * (21 * 21 - nqf * nkf)
    # the probe's kept key means (the new chunk averaged, the earlier frames' means from an earlier call): the
    # same output and the same attn_logit bits as averaging all of k in this call
    kept, old = torch.zeros(1, heads, 21, 128, device="cuda"), nkf - nqf
    if old:  # an earlier call over the earlier frames alone keeps their means
        fa.frame_forward_into_store(q, k[:, : old * fsl].contiguous(), v[:, : old * fsl].contiguous(),
                                    frame_seq_len=fsl, logit_out=torch.empty_like(logit_out), query_index=qi,
                                    key_index=ki[:old], key_means=kept, fresh=[(0, old, 21 - nkf)])
    got = torch.full_like(logit_out, float("nan"))
    out = fa.frame_forward_into_store(q, k, v, frame_seq_len=fsl, logit_out=got, query_index=qi, key_index=ki,
                                      key_means=kept, fresh=[(old, nkf, 21 - nqf)])
    assert torch.equal(out, base) and torch.equal(got.nan_to_num(7.0), logit_out.nan_to_num(7.0))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("batch, nkf", [(1, 3), (1, 12), (1, 21), (2, 21)])
def test_gpu_warp_specialised_variants_at_rollout_shapes(fa, batch, nkf):
    """Every WS sweep candidate at the 1.3B rollout's call shapes (12 heads, 3 query frames, 3/12/21 key frames,
    batch 1 and, as with CFG, 2; the GPU's own split plan): the output is within bf16 rounding of the blockwise
    reference and of the default forward, the same bits on every call, and the same bits when replayed from a
    CUDA graph."""
    from models.common.triton_attention import frame_attention
    from models.common.triton_attention_plan import FUSED_WS_CANDIDATES

    _ws_config_or_skip()
    fsl, nqf, heads = 1560, 3, 12
    q, k, v = (t.to("cuda") for t in rand_qkv(batch, heads, 128, fsl, nqf, nkf, dtype=torch.bfloat16, seed=nkf))
    base = frame_attention(q, k, v, frame_seq_len=fsl).out
    out_r, _ = ref.frame_attention_reference(q, k, v, frame_seq_len=fsl)
    for cfg in FUSED_WS_CANDIDATES:
        out = frame_attention(q, k, v, frame_seq_len=fsl, config=cfg).out
        assert (out.float() - out_r.float()).abs().max() < 2e-2, cfg
        assert (out.float() - base.float()).abs().max() < 2e-2, cfg
        assert torch.equal(frame_attention(q, k, v, frame_seq_len=fsl, config=cfg).out, out), cfg
        static = torch.empty_like(out)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            frame_attention(q, k, v, frame_seq_len=fsl, config=cfg)  # allocations settle outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static.copy_(frame_attention(q, k, v, frame_seq_len=fsl, config=cfg).out)
        static.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, out), cfg


def _gluon_or_skip():
    from models.common import gluon_attention

    if torch.cuda.get_device_capability() != (9, 0) or os.environ.get(gluon_attention.DISABLE_ENV) == "0":
        pytest.skip("the Gluon forward runs on sm90 only")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B, H, fsl, nqf, nkf, split", [
    (2, 2, 128, 2, 5, 1),  # frames of one key tile: every tile, the first too, ends a key frame
    (1, 3, 128, 2, 5, 3),
    (2, 3, 200, 2, 4, 2),  # frame edges inside key tiles; 2 x 3 x ceil(400 / 128) = 24 tiles, the last 12 split
    (1, 2, 256, 3, 6, 4),  # edges on tile boundaries
    (1, 4, 1560, 3, 7, 3),  # the model's frames, split into segments
    (2, 2, 1560, 3, 3, 1),
])
def test_gpu_gluon_forward_matches_float64(fa, B, H, fsl, nqf, nkf, split):
    """The Gluon forward (models/common/gluon_attention.py) with its frame sums: output, log-sum-exp and every
    row's mass on every key frame equal a float64 softmax, with whole tiles and split ones (merged), frames of one
    key tile, frames whose edges fall inside or on tile boundaries; asking for the sums and the LSE leaves the
    output's bits unchanged; the frame means (from torch and from Triton) equal float64's; replaying from a CUDA
    graph gives the same bits."""
    from models.common.triton_attention import frame_attention

    _gluon_or_skip()
    q, k, v = (t.to("cuda") for t in rand_qkv(B, H, 128, fsl, nqf, nkf, dtype=torch.bfloat16, peak=2.0,
                                              seed=fsl + nkf))
    n_tiles = B * H * math.ceil(nqf * fsl / 128)
    cfg = {"GLUON": True, "split": split, "n_full": n_tiles // 2}
    base = frame_attention(q, k, v, frame_seq_len=fsl, config=cfg).out
    r = frame_attention(q, k, v, frame_seq_len=fsl, with_mass=True, with_lse=True, config=cfg)
    assert torch.equal(r.out, base)
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(128)
    p = torch.softmax(s, dim=-1)
    out_d = (p @ v64).transpose(1, 2)
    mass_d = p.reshape(B, H, nqf * fsl, nkf, fsl).sum(-1).transpose(2, 3) / fsl  # [B, H, nkf, Lq]
    assert (r.out.double() - out_d).abs().max() < 2e-2
    assert (r.lse.double() - torch.logsumexp(s, dim=-1)).abs().max() < 1e-4
    assert (r.row_mass.double() - mass_d).abs().max() * fsl < 1e-5  # a row's mass, not divided by fsl
    for means in ("torch", "triton"):  # the frame means beside it (attn_logit's), both ways
        fm = frame_attention(q, k, v, frame_seq_len=fsl, with_mass=True, frame_means=True,
                             config={**cfg, "MEANS": means})
        assert torch.equal(fm.out, base), means
        assert (fm.q_means.double() - q64.reshape(B, H, nqf, fsl, 128).mean(3)).abs().max() < 1e-6, means
        assert (fm.k_means.double() - k64.reshape(B, H, nkf, fsl, 128).mean(3)).abs().max() < 1e-6, means
    static = torch.empty_like(base)
    graph = torch.cuda.CUDAGraph()
    frame_attention(q, k, v, frame_seq_len=fsl, with_mass=True, config=cfg)  # compiled outside the capture
    with torch.cuda.graph(graph):
        static.copy_(frame_attention(q, k, v, frame_seq_len=fsl, with_mass=True, config=cfg).out)
    static.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, base)


# ------------------------------------------------------------------ compile for Hopper without a GPU (AOT)

_AOT_SCRIPT = r"""
import json
import math
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from models.common import triton_attention_kernels as ta
from models.common.triton_attention_plan import FUSED_WS_CANDIDATES
from workbench.kernels import frame_attention as fa

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
STRIDES = ["stride_qb", "stride_qm", "stride_qh", "stride_kb", "stride_kn", "stride_kh", "stride_vb", "stride_vn",
           "stride_vh", "stride_ob", "stride_om", "stride_oh", "stride_lb", "stride_lh"]
# a TMA copy: the descriptor's block (its box, encoded from it) and the shared-memory tile the copy fills
COPY = re.compile(r"async_tma_copy_global_to_local [^\n]*?!tt\.tensordesc<tensor<([0-9x]+)x\w+[^\n]*?"
                  r"-> !ttg\.memdesc<([0-9x]+)x\w+")

def elements(dims):
    return math.prod(int(d) for d in dims.split("x"))

def build(kernel, types, constexprs, warps, stages):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    div16 = [n for n in names if n in STRIDES or sig[n].startswith("*")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=kernel, constexprs=constexprs, signature=sig, attrs=attrs)
    cc = triton.compile(src, target=target, options=backend.parse_options(
        {"num_warps": warps, "num_stages": stages}).__dict__)
    ttgir = cc.asm["ttgir"]
    copies = COPY.findall(ttgir)
    return {"wgmma": ttgir.count("warp_group_dot "), "tma": ttgir.count("async_tma_copy_global_to_local"),
            "tma_parsed": len(copies), "tma_box_mismatch": [c for c in copies if elements(c[0]) != elements(c[1])],
            "cp_async": ttgir.count("async_copy_global_to_local"), "smem": cc.metadata.shared,
            "ws": ttgir.count("ttg.warp_specialize("), "setmaxnreg": cc.asm["ptx"].count("setmaxnreg")}

res = {}
for tma, mask, extras in [(True, False, True), (True, False, False), (False, False, True), (False, True, True)]:
    t = {n: "*bf16" for n in ["Q", "K", "V", "Out"]}
    t.update(RS="*fp32", RM="*fp32", Allowed="*i8" if mask else "*fp32", qk_scale="fp32", PACC="*fp32", PM="*fp32",
             PL="*fp32", QSUM="*fp32", KSUM="*fp32", LSE="*fp32")
    t["desc_k"] = t["desc_v"] = "tensordesc<bf16[64, 128]>" if tma else "*bf16"
    ce = dict(FSL=1560, HEAD_DIM=128, NKF_PAD=32 if mask else 16, EPI_F=32, HAS_MASK=mask, USE_TMA=tma,
              DOT_F32=False, IEEE=False, WITH_MASS=extras, WITH_SUMS=extras, WITH_LSE=extras, BLOCK_M=128,
              BLOCK_N=64, WS=False)  # extras off: the model's own forward (attention_kernel="triton")
    res[f"fused_tma{int(tma)}_mask{int(mask)}" + ("" if extras else "_plain")] = build(
        ta._frame_attn_fwd_kernel, t, ce, 8, 3)
# the opt-in warp-specialised plain forward (q through TMA too; sm90 specialises it with 4 warps a consumer group)
t.update(Allowed="*fp32")
ce.update(HAS_MASK=False, USE_TMA=True, WITH_MASS=False, WITH_SUMS=False, WITH_LSE=False, NKF_PAD=16, WS=True)
for cfg in FUSED_WS_CANDIDATES:
    t["desc_k"] = t["desc_v"] = f"tensordesc<bf16[{cfg['BLOCK_N']}, 128]>"
    res[f"ws_bn{cfg['BLOCK_N']}_s{cfg['num_stages']}"] = build(
        ta._frame_attn_fwd_kernel, t, dict(ce, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]), cfg["num_warps"],
        cfg["num_stages"])
t = dict(Q="*bf16", K="*bf16", LSE="*fp32", TOK="*fp32", Allowed="*fp32", qk_scale="fp32")
ce = dict(FSL=1560, HEAD_DIM=128, HAS_MASK=False, DOT_F32=False, IEEE=False, BLOCK_M=128, BLOCK_N=128)
res["key_token"] = build(fa._key_token_kernel, t, ce, 8, 2)
print("AOT" + json.dumps(res))
"""


def _compile_in_subprocess(script: str) -> dict:
    """Run an ahead-of-time compile script in a fresh process without the interpreter; its "AOT{json}" line."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("AOT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][3:])


def test_kernels_compile_for_hopper_without_gpu():
    """Compile (not run) the kernels for sm_90 in a fresh process without the interpreter: catches what the
    interpreter cannot (constexpr rules, layouts, TMA lowering) and checks that the main loop uses wgmma and
    asynchronous (pipelined) loads, and that every TMA copy fills exactly the box of its descriptor."""
    skip_unless_tested_triton()
    res = _compile_in_subprocess(_AOT_SCRIPT)
    for name, info in res.items():
        assert info["wgmma"] >= 1, (name, info)  # Hopper tensor-core dots
        assert info["tma"] + info["cp_async"] >= 2, (name, info)  # K/V loads are asynchronous (pipelined)
        assert info["smem"] <= 227 * 1024, (name, info)
    assert res["fused_tma1_mask0"]["tma"] >= 2
    for name, info in res.items():
        # a box larger than its tile writes past the tile's buffer: the WS forward's first H200 run died of q copies
        # whose host-encoded box held twice the tile left after sm90's pass split it between consumer groups
        assert info["tma_parsed"] == info["tma"] and not info["tma_box_mismatch"], (name, info)
    for name, info in res.items():  # only the opt-in WS variants are warp-specialised (producer + consumers)
        assert (info["ws"] >= 1 and info["setmaxnreg"] >= 2) == name.startswith("ws_"), (name, info)


_GLUON_AOT = r"""
import json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from models.common import gluon_attention as ga

target = GPUTarget("cuda", 90, 32)
t = torch.zeros(256, 1536, dtype=torch.bfloat16)
dk = mangle_type(ga._desc(t, [ga.BLOCK_N, 128]))
types = dict(desc_q=mangle_type(ga._desc(t, [64, 128])), desc_k=dk, desc_v=dk, out_ptr="*bf16", qk_scale="fp32",
             **{n: "*fp32" for n in ("lse_ptr", "rs_ptr", "rm_ptr", "pacc_ptr", "pm_ptr", "pl_ptr")})
res = {}
for mass in (False, True):
    ce = dict(HEAD_DIM=128, BLOCK_N=ga.BLOCK_N, STAGES=ga.STAGES, FSL=1560, WITH_MASS=mass, WITH_LSE=True,
              CONSUMER_REGS=ga.CONSUMER_REGS, PRODUCER_REGS=ga.PRODUCER_REGS)
    sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in ga._attn_fwd.arg_names}
    cc = triton.compile(GluonASTSource(fn=ga._attn_fwd, signature=sig, constexprs=ce), target=target,
                        options=make_backend(target).parse_options({"num_warps": 4}).__dict__)
    ptx = cc.asm["ptx"]
    res[str(mass)] = {"smem": cc.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
                      "setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)))}
print("AOT" + json.dumps(res))
"""


def test_gluon_forward_compiles_for_hopper_without_gpu():
    """The Gluon forward (models/common/gluon_attention.py), compiled (not run) for sm_90 on the CPU, with and
    without the frame sums: tensor-core wgmma, the producer's and consumers' register budgets (setmaxnreg), and
    its 3-stage ring within the 227 KB of shared memory a CTA may use. (Its outputs are checked on an H200 by
    bench/bench_gluon_attention.py and the GPU tests that run "auto".)"""
    skip_unless_tested_triton()
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    for mass, info in _compile_in_subprocess(_GLUON_AOT).items():
        assert info["wgmma"] >= 16, (mass, info)
        assert {"24", "240"} <= set(info["setmaxnreg"]), (mass, info)
        assert 200 * 1024 < info["smem"] <= 227 * 1024, (mass, info)

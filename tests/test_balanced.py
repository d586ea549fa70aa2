"""The wave-balanced schedule (models/common/balanced_attention.py): the same softmax(q k^T * scale) v from a main
call and a tail split into key segments, merged exactly. CPU tests run the schedule around a float64 reference
kernel and the Triton assembling merge under the interpreter; `gpu` tests run cuDNN's kernel on it at the
rollout's shapes (against float64, bitwise on the main rows, neutral to the indicator capture, graph == eager)."""

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the merge kernel's module is imported

from conftest import triton_module  # noqa: E402
from models.common import attention_kernels as ak  # noqa: E402
from models.common.balanced_attention import Plan, balanced_attention, merge_segments, plan, segments  # noqa: E402


def reference(q, k, v, scale):
    """float64 (out [B, Lq, H, Dv] in q's dtype, lse [B, H, Lq] float32), and counts its calls."""
    reference.calls.append((tuple(q.shape), tuple(k.shape)))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())
    return out.to(q.dtype), torch.logsumexp(s, -1).float()


reference.calls = []


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("B,H,Lq,kf,slots", [(1, 12, 4680, 21, 132), (1, 12, 4680, 9, 132), (2, 12, 4680, 21, 132),
                                             (1, 40, 4680, 12, 132), (1, 3, 300, 8, 7), (1, 12, 4224, 21, 132)])
def test_plan_main_rows_fill_whole_waves_and_segments_divide_the_keys(B, H, Lq, kf, slots):
    Lk = kf * 1560
    p = plan(B, H, Lq, Lk, slots)
    q_blocks = -(-Lq // 128)
    plain_cost = -(-B * H * q_blocks // slots) * Lk
    if p.split == 1:
        assert p.main_rows == Lq and p.cost == plain_cost
    else:
        assert p.main_rows % 128 == 0 and 0 <= p.main_rows < Lq
        assert (B * H * (p.main_rows // 128)) % slots == 0  # whole waves
        assert Lk % p.split == 0 and p.cost < plain_cost


def test_plan_at_the_rollouts_shapes_splits_every_self_attention_call_and_no_cross_attention_call():
    """The cost model's constants were fitted on an H200 (bench/bench_balanced.py): with the merge one Triton
    launch, splitting the tail pays from 3 key frames on; a 512-token cross-attention call stays one call."""
    got = {kf: plan(1, 12, 4680, kf * 1560, 132) for kf in (3, 6, 9, 12, 15, 18, 21)}
    assert all(p.split > 1 and p.main_rows == 4224 for p in got.values())  # 33 blocks x 12 heads = 3 x 132
    assert got[21].cost < 0.9 * 4 * 21 * 1560  # the plain call: 4 waves of 21 frames' keys
    assert plan(1, 12, 4680, 512, 132).split == 1
    assert plan(1, 12, 4224, 21 * 1560, 132).split == 1  # 396 tiles: whole waves already


# ------------------------------------------------------------------------------------- the schedule's math


@pytest.mark.parametrize("B,H,Lq,Lk,D,Dv,p", [
    (1, 3, 300, 600, 16, 16, Plan(224, 2, 0)),   # main + a tail in 2 segments
    (2, 3, 300, 600, 16, 24, Plan(0, 3, 0)),     # no main call, value dim other than q's
    (2, 2, 100, 480, 8, 8, Plan(64, 5, 0)),      # batch 2
])
def test_balanced_equals_one_call_of_the_kernel(B, H, Lq, Lk, D, Dv, p):
    q, k, v = rand(B, Lq, H, D, seed=1), rand(B, Lk, H, D, seed=2), rand(B, Lk, H, Dv, seed=3)
    reference.calls = []
    out, lse = balanced_attention(q, k, v, 0.3, reference, slots=7, p=p)
    assert len(reference.calls) == (2 if p.main_rows else 1)
    assert reference.calls[0] == ((B * p.split, Lq - p.main_rows, H, D), (B * p.split, Lk // p.split, H, D))
    want, want_lse = reference(q, k, v, 0.3)
    assert out.shape == (B, Lq, H, Dv) and lse.shape == (B, H, Lq)
    assert (out - want).abs().max() < 1e-6  # float32 log-sum-exps weight the segments
    assert (lse - want_lse).abs().max() < 1e-5
    # it can fail: the segments' weights matter (an unweighted mean of the segments is far off)
    mean = reference(q[:, p.main_rows:], k[:, : Lk // p.split], v[:, : Lk // p.split], 0.3)[0]
    assert (mean - want[:, p.main_rows:]).abs().max() > 1e-2


def test_keys_that_cannot_be_cut_as_a_view_run_one_plain_call():
    B, Lk = 2, 600
    cache = rand(B, 900, 3, 16, seed=4)  # a cache: the call reads a prefix, batches 900 rows apart
    k = v = cache[:, :Lk]
    assert segments(k, 2) is None and segments(cache[:1, :Lk], 2) is not None
    reference.calls = []
    out, _ = balanced_attention(rand(B, 300, 3, 16, seed=5), k, v, 0.3, reference, slots=7, p=Plan(224, 2, 0))
    assert len(reference.calls) == 1 and reference.calls[0][1] == (B, Lk, 3, 16)


def test_merge_segments_is_the_softmax_over_all_keys():
    q, k, v = rand(1, 20, 2, 8, seed=6), rand(1, 60, 2, 8, seed=7), rand(1, 60, 2, 8, seed=8)
    parts = [reference(q, k[:, i:i + 20], v[:, i:i + 20], 0.5) for i in (0, 20, 40)]
    out_s = torch.stack([p[0] for p in parts], 1)  # [B, S, L, H, D]
    lse_s = torch.stack([p[1] for p in parts], 1)  # [B, S, H, L]
    out, lse = merge_segments(out_s, lse_s, torch.float64)
    want, want_lse = reference(q, k, v, 0.5)
    assert (out - want).abs().max() < 1e-6 and (lse - want_lse).abs().max() < 1e-5


# ------------------------------------------------------------------------------- the Triton assembling merge


@pytest.fixture(scope="module")
def merge_module():
    return triton_module("models.common.triton_balanced_merge")


@pytest.mark.parametrize("M,Lt,S,Dv", [(64, 40, 3, 16), (0, 50, 2, 24), (32, 7, 5, 8)])
def test_triton_assemble_equals_the_torch_merge(merge_module, M, Lt, S, Dv):
    B, H = 2, 3
    dev = "cuda" if CUDA else "cpu"
    out_m, lse_m = rand(B, M, H, Dv, seed=9, dtype=torch.float32).to(dev), rand(B, H, M, seed=10).float().to(dev)
    out_s = rand(B * S, Lt, H, Dv, seed=11, dtype=torch.float32).to(dev)
    lse_s = (rand(B * S, H, Lt, seed=12) * 3).float().to(dev)
    out, lse = merge_module.assemble(out_m, lse_m, out_s, lse_s, S)
    want_t, want_lse_t = merge_segments(out_s.view(B, S, Lt, H, Dv), lse_s.view(B, S, H, Lt), torch.float32)
    assert out.shape == (B, M + Lt, H, Dv) and lse.shape == (B, H, M + Lt)
    assert torch.equal(out[:, :M], out_m) and torch.equal(lse[:, :, :M], lse_m)
    assert (out[:, M:] - want_t).abs().max() < 1e-5 and (lse[:, :, M:] - want_lse_t).abs().max() < 1e-5
    with pytest.raises(ValueError, match="multiple of 32"):
        merge_module.assemble(out_s[:B, :5], lse_s[:B, :, :5], out_s, lse_s, S)


# ----------------------------------------------------------------------------------------- the kernel table


def test_the_balanced_kernel_runs_on_hopper_gpus_only_and_captures_by_indicator():
    kern = ak.KERNELS["cudnn-balanced"]
    assert not kern.runs_on("cpu", torch.bfloat16) and not kern.runs_on("cuda", torch.float32)
    assert kern.capture_mode == "indicator" and kern.refuses and "lse" in kern.returns
    assert ak.CHOICES["auto"].index("cudnn-balanced") < ak.CHOICES["auto"].index("cudnn")
    assert "cudnn-balanced" not in ak.CHOICES["cudnn"]
    hopper = CUDA and torch.cuda.get_device_capability()[0] == 9
    assert ak.describe("cuda", torch.bfloat16, "cudnn") == "cudnn"
    assert ak.describe("cuda", torch.bfloat16, "cudnn-balanced") == ("cudnn-balanced" if hopper else "cudnn")
    if not ak.KERNELS["flash-attn"].runs_on("cuda", torch.bfloat16):  # sm90 runs the Gluon forward first
        gluon = ak.KERNELS["gluon"].runs_on("cuda", torch.bfloat16)
        assert ak.describe("cuda", torch.bfloat16, "auto") == ("gluon" if gluon else "cudnn-balanced" if hopper
                                                                 else "cudnn")


# ------------------------------------------------------------------------------------ GPU: cuDNN at scale


def _hopper():
    return CUDA and torch.cuda.get_device_capability()[0] == 9


def rollout_qkv(kf, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, 4680, 12, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, kf * 1560, 12, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, kf * 1560, 12, 128, device="cuda", generator=g).bfloat16()
    return q, k, v


def float64_heads(q, k, v, heads=(0, 5)):
    outs, lses = [], []
    for h in heads:
        s = q[0, :, h].double() @ k[0, :, h].double().T / math.sqrt(q.shape[-1])
        outs.append(torch.softmax(s, -1) @ v[0, :, h].double())
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs, 1), torch.stack(lses)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the balanced kernel runs on Hopper GPUs")
@pytest.mark.parametrize("kf", [9, 21])
def test_gpu_balanced_cudnn_at_rollout_shapes(kf):
    from models.common.cuda_attention import cudnn

    q, k, v = rollout_qkv(kf)
    scale = 1 / math.sqrt(128)
    assert ak.select(q, k, v, frame_seq_len=1560, kernel="cudnn-balanced").name == "cudnn-balanced"
    out, lse, kern = ak.compute(q, k, v, frame_seq_len=1560, lse=True, kernel="cudnn-balanced")
    assert kern.name == "cudnn-balanced"
    p = plan(1, 12, 4680, kf * 1560, torch.cuda.get_device_properties(0).multi_processor_count)
    assert p.split > 1
    one, one_lse = cudnn(q, k, v, scale)
    want, want_lse = float64_heads(q, k, v)
    err = (out[0, :, [0, 5]].double() - want).abs().max().item()
    err_one = (one[0, :, [0, 5]].double() - want).abs().max().item()
    assert err <= 2 * err_one + 1e-4, (err, err_one)  # bf16 rounding, as one call
    assert (lse[0, [0, 5]].double() - want_lse).abs().max() < 1e-4
    assert torch.equal(out[:, : p.main_rows], one[:, : p.main_rows])  # the main rows are one call's own bits
    # the indicator capture widens V: the first 128 columns keep the plain call's bits (capture is neutral)
    from workbench.kernels.indicator import attention_with_frame_mass_indicator

    got, mass = attention_with_frame_mass_indicator(q, k, v, frame_seq_len=1560, kernel=kern)
    assert torch.equal(got, out)
    assert (mass.sum(-1) - 1).abs().max() < 1e-2
    # a CUDA graph of the call replays the eager bits
    static = ak.compute(q, k, v, frame_seq_len=1560, kernel="cudnn-balanced")[0]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = ak.compute(q, k, v, frame_seq_len=1560, kernel="cudnn-balanced")[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, static) and torch.equal(static, out)


def test_stores_record_the_balanced_kernel_in_their_fingerprint(monkeypatch):
    """A store made on the balanced kernel never takes samples of one cuDNN call (their bits differ in the tail
    rows), and the stores that "auto" made on Hopper before it (one cuDNN call) resume with --attention-kernel
    cudnn: its fingerprint is theirs."""
    from workbench import extract as ex

    def fields(kernel, backend):
        monkeypatch.setattr(ex, "describe", lambda device, dtype, choice, **geometry: backend)
        return ex.fingerprint_fields(ex.plan(ex.ExtractConfig(layers=[3], attention_kernel=kernel)), "sha")["model"]

    old = fields("auto", "cudnn")  # what "auto" ran on Hopper before the balanced kernel, and runs on other GPUs
    new = fields("auto", "cudnn-balanced")
    assert new["attn_backend"] == "cudnn-balanced" and "attn_backend" not in old and new != old
    assert fields("cudnn", "cudnn") == old
    assert fields("triton", "triton")["attention_kernel"] == "triton"


def test_calls_that_need_gradients_run_one_cudnn_call(monkeypatch):
    """The merge has no backward: with autograd on and an input that requires grad (training), the balanced
    kernel does not take the call, so the next kernel of the order (one cuDNN call) computes it."""
    monkeypatch.setattr(ak, "_hopper", lambda device: True)  # as on an H200
    q, k, v = (torch.zeros(1, 8, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    takes = ak.KERNELS["cudnn-balanced"].takes
    assert takes(q, k, v, 8)
    assert not takes(q.requires_grad_(), k, v, 8)
    with torch.no_grad():
        assert takes(q, k, v, 8)
    assert not takes(q.float(), k.float(), v.float(), 8)  # half precision only


def test_indicator_capture_through_the_schedule_keeps_the_output_and_sums_each_frame(monkeypatch):
    """The widened value tensor goes through the split and the merge like V (the merge is per column): its first
    head_dim columns are the plain balanced output and the indicator columns the exact frame mass.
    (cuDNN replaced by the float64 reference, the merge by its torch version: the schedule's logic on the CPU.)"""
    from models.common import balanced_attention as ba
    from models.common import cuda_attention
    from workbench.kernels.indicator import attention_with_frame_mass_indicator
    from workbench.kernels.reference import frame_mass_reference

    monkeypatch.setattr(cuda_attention, "cudnn", reference)
    monkeypatch.setattr(ak, "_gpu", lambda device: (7, True))  # 7 SMs
    monkeypatch.setattr(ba, "plan", lambda *a, **kw: Plan(16, 3, 0))  # 16 main rows, the tail in 3 key segments
    fsl = 16
    q, k, v = rand(1, 3 * fsl, 2, 8, seed=13), rand(1, 6 * fsl, 2, 8, seed=14), rand(1, 6 * fsl, 2, 8, seed=15)
    kern = ak.KERNELS["cudnn-balanced"]
    reference.calls = []
    plain = kern.run(q, k, v, 8 ** -0.5, None, fsl, False)[0]
    assert reference.calls == [((3, 32, 2, 8), (3, 32, 2, 8)), ((1, 16, 2, 8), (1, 96, 2, 8))]  # tail, then main
    got, mass = attention_with_frame_mass_indicator(q, k, v, frame_seq_len=fsl, kernel=kern)
    assert (got - plain).abs().max() < 1e-12  # (bitwise with cuDNN: the GPU test; CPU BLAS may vary with the width)
    assert (mass.double() - frame_mass_reference(q, k, frame_seq_len=fsl)).abs().max() < 1e-6

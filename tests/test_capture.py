"""StatsProbe on the tiny model: the statistics equal a dense float64 reference, cell by cell, with the right
labels (layer, step, head, query frame, key frame) for global attention, sink + window eviction, a window
without sink, the bidirectional sampler and the block-causal full-sequence forward; and capture never
changes the rollout (bitwise in "exact" mode).

The reference side never reads the probe's labels: q and k come from forward pre-hooks on
`blocks[i].self_attn.attend` (layer = module path, step and chunk = visit order) and the key window from the
closed-form window rule (tests/attention_reference.py). Each comparison is paired with a check
that the reference itself tells neighbouring layers / steps / heads / frames apart by far more than the
tolerance, so a mislabelled cell cannot pass.
"""

import numpy as np
import pytest
import torch

from attention_reference import (AttendRecorder, dense_cross_mass, dense_frame_stats, dense_key_token_mass,
                                 expected_key_frames, max_abs_diff)
from conftest import tiny_model
from models.common.attention import ForwardLabels
from models.common.rollout import bidirectional, causal_few_step
from models.common.scheduler import FlowMatchScheduler
from models.errors import ModelInputError
from workbench.capture import CaptureSpec, Geometry, StatsProbe, resolve_mode
from workbench.errors import WorkbenchError
from workbench.hooks import attach

C, H, W = 16, 4, 6  # latent channels and size: 2 x 3 = 6 tokens per frame
FSL, NFPB, TEXT_LEN, STEPS = 6, 3, 16, 5  # few-step rollout: 4 denoising steps + the context pass
WINDOWS = {"global": dict(), "sink_window": dict(local_attn_size=6, sink_size=1),
           "window_no_sink": dict(local_attn_size=6, sink_size=0)}
# float32: 1e-6 absolute for probabilities; logits reach ~8 here, where one float32 ulp is 9.5e-7, so the
# logit bound is 1e-6 relative above 1. bfloat16: 1e-3 absolute (the bound), both statistics.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def make_inputs(frames, dtype, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(1, frames, C, H, W, generator=g, device=device).to(dtype)
    ctx = torch.randn(1, TEXT_LEN, 32, generator=g, device=device).to(dtype)
    return noise, ctx, g


def few_step(model, frames, dtype, *probes, seed=0):
    noise, ctx, g = make_inputs(frames, dtype, seed, next(model.parameters()).device)
    s = FlowMatchScheduler(5.0)
    with attach(model, *probes) if probes else _null():
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def full_spec(model, stats=("attn_mass", "attn_logit"), **kw):
    cfg = model.config
    return CaptureSpec(layers=tuple(range(cfg.num_layers)), heads=tuple(range(cfg.num_heads)),
                       steps=tuple(range(STEPS)), stats=stats, **kw)


def reference_from_records(rec, num_layers, heads, frames, key_frames_of):
    """Expected [step, layer, head, query_frame, key_frame] arrays (NaN outside each call's window)."""
    exp = {n: np.full((STEPS, num_layers, heads, frames, frames), np.nan) for n in ("attn_mass", "attn_logit")}
    for layer, calls in rec.records.items():
        assert len(calls) == STEPS * frames // NFPB  # 5 forwards per chunk
        for visit, (q, k, _call) in enumerate(calls):
            chunk, step = divmod(visit, STEPS)
            qf = np.arange(chunk * NFPB, (chunk + 1) * NFPB)
            kf = np.array(key_frames_of(chunk))
            assert k.shape[1] == len(kf) * FSL  # the keys the kernel saw are exactly the expected window
            mass, logit = dense_frame_stats(q, k, FSL)
            exp["attn_mass"][step, layer][:, qf[:, None], kf[None, :]] = mass[0].cpu().numpy()
            exp["attn_logit"][step, layer][:, qf[:, None], kf[None, :]] = logit[0].cpu().numpy()
    return exp


def assert_close_to_reference(got, exp, tol, name):
    """NaN exactly where the reference is NaN; |got - ref| <= tol (scaled by |ref| above 1 for logits)."""
    assert np.array_equal(np.isnan(got), np.isnan(exp)), f"{name}: NaN pattern differs from the key windows"
    ok = ~np.isnan(exp)
    scale = np.maximum(1.0, np.abs(exp[ok])) if name == "attn_logit" else 1.0
    err = np.abs(got[ok] - exp[ok]) / scale
    assert err.max() <= tol, f"{name}: max error {err.max():.3g} > {tol}"


def assert_discriminates(exp, tol):
    """Moving any label by one (step, layer, head, query frame, key frame) changes the reference by far more
    than the tolerance: a probe that put values in a neighbouring cell could not pass."""
    for axis in range(exp.ndim):
        if exp.shape[axis] < 2:
            continue
        a, b = np.take(exp, range(1, exp.shape[axis]), axis=axis), np.take(exp, range(exp.shape[axis] - 1), axis=axis)
        both = ~np.isnan(a) & ~np.isnan(b)
        assert np.abs(a[both] - b[both]).max() > 100 * tol, f"axis {axis} does not separate neighbouring labels"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("window", list(WINDOWS), ids=list(WINDOWS))
def test_stats_equal_float64_reference_with_right_labels(window, dtype):
    model = tiny_model(**WINDOWS[window]).to(dtype)
    frames = 9 if window == "global" else 12  # the windowed runs evict: 4 chunks through a 6-frame cache
    cfg = model.config
    probe = StatsProbe(full_spec(model), Geometry(1, frames, FSL, TEXT_LEN), "cpu")
    rec = AttendRecorder(model, range(cfg.num_layers))
    few_step(model, frames, dtype, probe)
    rec.remove()
    got = {name: values[0] for name, values in probe.results().items()}  # [S, L, H, F, F]

    def key_frames_of(chunk):
        return expected_key_frames(chunk, NFPB, cfg.local_attn_size, cfg.sink_size)

    exp = reference_from_records(rec, cfg.num_layers, cfg.num_heads, frames, key_frames_of)
    tol = TOL[dtype]
    for name in ("attn_mass", "attn_logit"):
        assert_close_to_reference(got[name], exp[name], tol, name)
        assert_discriminates(exp[name], tol)
    # rows sum to 1 over the attended key frames
    np.testing.assert_allclose(np.nansum(got["attn_mass"], axis=-1), 1.0, atol=1e-3)
    # the call labels agree with the module path and the visit order
    for layer, calls in rec.records.items():
        for visit, (_, _, call) in enumerate(calls):
            chunk, step = divmod(visit, STEPS)
            assert (call.layer, call.labels.step, call.labels.chunk) == (layer, step, chunk)
            assert call.labels.phase == ("context" if step == 4 else "denoise")
            assert call.query_frames == tuple(range(chunk * NFPB, (chunk + 1) * NFPB))
            assert call.key_frames == key_frames_of(chunk)
    # the keys labelled frame f are frame f's keys: those its own chunk's context pass wrote (sink included)
    for layer, calls in rec.records.items():
        for visit, (_, k, call) in enumerate(calls):
            for slot, f in enumerate(call.key_frames):
                if f // NFPB == visit // STEPS:
                    continue  # the call's own chunk
                _, k_ctx, _ = calls[(f // NFPB) * STEPS + 4]  # that context pass's window ends with frame f's chunk
                at = key_frames_of(f // NFPB).index(f) * FSL
                assert torch.equal(k[:, slot * FSL:(slot + 1) * FSL], k_ctx[:, at:at + FSL]), (layer, visit, f)
    if window != "global":  # eviction really happened: the last chunk does not see frames 1..5
        assert key_frames_of(3) == ((0,) if cfg.sink_size else ()) + tuple(range(12 - 6 + cfg.sink_size, 12))
        assert np.isnan(got["attn_mass"][:, :, :, 9:, 1:6]).all()


def test_bidirectional_sampler_labels_and_values():
    """One chunk holding every frame, CFG branches as separate steps, no NaN anywhere."""
    model = tiny_model(causal=False)
    frames, steps = 6, 2
    noise, ctx, g = make_inputs(frames, torch.float32)
    neg = torch.randn(ctx.shape, generator=g)
    spec = CaptureSpec(layers=(0, 1), heads=(0, 1, 2, 3), steps=tuple(range(2 * steps)))
    probe = StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu")
    rec = AttendRecorder(model, [0, 1])
    with attach(model, probe):
        bidirectional(model, noise, ctx, neg, steps=steps, solver="euler")
    rec.remove()
    got = {name: values[0] for name, values in probe.results().items()}
    for name in got:
        assert not np.isnan(got[name]).any()
    for layer, calls in rec.records.items():
        assert len(calls) == 2 * steps  # (cond, uncond) per solver step
        for visit, (q, k, call) in enumerate(calls):
            assert (call.layer, call.labels.step, call.labels.chunk) == (layer, visit, 0)
            assert call.labels.cfg == ("cond", "uncond")[visit % 2] and call.labels.denoise_index == visit // 2
            assert call.query_frames == call.key_frames == tuple(range(frames))
            mass, logit = dense_frame_stats(q, k, FSL)
            assert max_abs_diff(got["attn_mass"][visit, layer], mass[0].numpy()) <= 1e-6
            assert max_abs_diff(got["attn_logit"][visit, layer], logit[0].numpy()) <= 1e-5
    # cond and uncond see different text, so their attention differs: a swapped branch would show
    assert np.abs(got["attn_mass"][0] - got["attn_mass"][1]).max() > 1e-3
    np.testing.assert_allclose(got["attn_mass"].sum(-1), 1.0, atol=1e-3)


@pytest.mark.parametrize("window", ["global", "sink_window"])
def test_block_causal_forward_is_nan_exactly_outside_the_mask(window):
    """The full-sequence (training) forward: one call per layer with a frame mask; masked pairs are NaN and
    out of the softmax."""
    model = tiny_model(**WINDOWS[window])
    frames = 12
    x = torch.randn(1, C, frames, H, W, generator=torch.Generator().manual_seed(1))
    t = torch.full((1, frames), 500.0)
    ctx = torch.randn(1, TEXT_LEN, 32, generator=torch.Generator().manual_seed(2))
    spec = CaptureSpec(layers=(0, 1), heads=(0, 1, 2, 3), steps=(0,),
                       stats=("attn_mass", "attn_logit", "attn_key_token", "cross_mass"), token_layers=(0, 1))
    probe = StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu")
    rec, cross = AttendRecorder(model, [0, 1]), AttendRecorder(model, [0, 1], kind="cross")
    with attach(model, probe):
        model(x, t, ctx, labels=ForwardLabels(step=0, timestep=500.0, chunk=0, phase="train"))
    rec.remove()
    cross.remove()
    got = probe.results()
    allowed = model.block_causal_mask(frames)
    # the mask itself, written out (chunks of 3, causal across chunks, window end - local .. end)
    end = (np.arange(frames) // NFPB + 1) * NFPB
    kf = np.arange(frames)[None, :]
    expect = kf < end[:, None]
    if window != "global":
        expect &= (kf >= end[:, None] - 5) | (kf < 1)
    assert np.array_equal(allowed.numpy(), expect)
    for layer in (0, 1):
        (q, k, _), = rec.records[layer]
        mass, logit = dense_frame_stats(q, k, FSL, frame_mask=allowed)
        assert max_abs_diff(got["attn_mass"][0, 0, layer], mass[0].numpy()) <= 1e-6
        assert max_abs_diff(got["attn_logit"][0, 0, layer], logit[0].numpy()) <= 1e-5
        # token by token (a mirrored token order inside a frame, or NaN on the wrong tokens, would show)
        tokens = dense_key_token_mass(q, k, FSL, frame_mask=allowed)[0].numpy()  # [H, F, F * FSL]
        assert max_abs_diff(got["attn_key_token"][0, 0, layer], tokens) <= 1e-6
        in_frames = tokens.reshape(4, frames, frames, FSL)[:, allowed.numpy()]  # [H, attended pairs, FSL]
        assert in_frames.std(-1).max() > 1e-3  # (a frame's tokens differ: their order matters)
        (qc, kc, call), = cross.records[layer]
        assert call.kind == "cross" and kc.shape[1] == TEXT_LEN
        assert max_abs_diff(got["cross_mass"][0, 0, layer], dense_cross_mass(qc, kc, FSL)[0].numpy()) <= 1e-6
    np.testing.assert_allclose(np.nansum(got["attn_mass"], -1), 1.0, atol=1e-3)
    assert np.abs(np.diff(got["cross_mass"][0, 0], axis=-2)).max() > 1e-3  # (query frames' text mass differs)


def test_head_layer_and_step_subsets_land_in_their_cells():
    """A capture of heads (1, 3), layer 1, steps (0, 4) equals the matching slice of a full capture."""
    model = tiny_model(local_attn_size=6, sink_size=1)
    full = StatsProbe(full_spec(model), Geometry(1, 12, FSL, TEXT_LEN), "cpu")
    part = StatsProbe(CaptureSpec(layers=(1,), heads=(1, 3), steps=(0, 4)), Geometry(1, 12, FSL, TEXT_LEN), "cpu")
    few_step(model, 12, torch.float32, full, part)
    f, p = full.results(), part.results()
    for name in p:
        sliced = f[name][:, [0, 4]][:, :, [1]][:, :, :, [1, 3]]
        assert np.array_equal(p[name], sliced, equal_nan=True)
        assert not np.array_equal(p[name], f[name][:, [0, 4]][:, :, [1]][:, :, :, [0, 2]], equal_nan=True)


def test_key_token_and_cross_mass_are_consistent():
    """attn_key_token summed over a key frame's tokens is attn_mass; cross_mass is a softmax over the text."""
    model = tiny_model(local_attn_size=6, sink_size=1)
    spec = full_spec(model, stats=("attn_mass", "attn_logit", "cross_mass", "attn_key_token"), token_layers=(1,))
    probe = StatsProbe(spec, Geometry(1, 12, FSL, TEXT_LEN), "cpu")
    few_step(model, 12, torch.float32, probe)
    r = probe.results()
    tok = r["attn_key_token"][0, :, 0]  # [S, H, F, F * fsl]
    per_frame = tok.reshape(*tok.shape[:-1], 12, FSL).sum(-1)
    np.testing.assert_allclose(per_frame, r["attn_mass"][0, :, 1], atol=1e-6)
    assert np.array_equal(np.isnan(per_frame), np.isnan(r["attn_mass"][0, :, 1]))
    cross = r["cross_mass"][0]
    assert cross.shape == (STEPS, 2, 4, 12, TEXT_LEN) and not np.isnan(cross).any()
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Capture changes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("window", ["global", "sink_window"])
def test_exact_capture_leaves_the_rollout_bitwise_unchanged(window, dtype):
    model = tiny_model(**WINDOWS[window]).to(dtype)
    frames = 12 if window != "global" else 9
    plain = few_step(model, frames, dtype)
    spec = CaptureSpec(layers=(0, 1), heads=(1, 3), steps=tuple(range(STEPS)),
                       stats=("attn_mass", "attn_logit", "cross_mass", "attn_key_token"), token_layers=(1,))
    probe = StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu", mode="exact")
    captured = few_step(model, frames, dtype, probe)
    assert torch.equal(captured, plain)
    assert not np.isnan(probe.results()["attn_mass"][0, 0, 0, 0, 0, 0])  # the probe did run
    assert not torch.equal(few_step(model, frames, dtype, seed=1), plain)  # and the comparison can fail


def test_capture_mode_must_match_the_attention_kernel():
    """Every mode computes the output with the model's own kernel, so pairs that cannot are refused before
    work, naming the fix; "auto" picks the fast neutral mode for each kernel."""
    spec = CaptureSpec(layers=(0,), heads=(0,), steps=(0,))
    geo = Geometry(1, 3, FSL, TEXT_LEN)
    with pytest.raises(WorkbenchError, match="'fused'.*Triton.*--attention-kernel triton"):
        StatsProbe(spec, geo, "cpu", mode="fused")
    with pytest.raises(WorkbenchError, match="kernel 'auto', whose statistics come with capture mode 'exact'. Use "
                                             "--attention-kernel triton, or capture mode 'exact'$"):
        resolve_mode("fused", "cpu", "auto")  # (on the CPU the stock kernel's statistics are exact's, not cuDNN's)
    with pytest.raises(WorkbenchError, match="'indicator'.*'triton'.*'fused'"):
        StatsProbe(spec, geo, "cuda", mode="indicator", kernel="triton")
    assert resolve_mode("auto", "cuda", "triton") == "fused"
    assert resolve_mode("auto", "cuda", "auto") == "indicator"
    assert resolve_mode("auto", "cpu", "triton") == "exact"
    assert resolve_mode("exact", "cuda", "triton") == "exact"
    with pytest.raises(ModelInputError, match="attention kernel 'cutlass'.*'auto', 'triton', 'cudnn'"):
        tiny_model().attention_kernel = "cutlass"


def test_fused_mode_where_the_triton_kernel_cannot_run_takes_the_exact_path(monkeypatch):
    """Where the Triton kernel does not take a call (a CPU without the interpreter; here forced, since
    tests/test_kernels.py turns the interpreter on for the whole process), the model uses its stock kernel and
    a "fused" probe takes the exact path per call. Outputs stay bitwise those of the plain run."""
    pytest.importorskip("triton")  # (the kernels extra; without it the stock kernel runs anyway)
    from models.common import triton_attention

    monkeypatch.setattr(triton_attention, "applies", lambda *args, **kwargs: False)
    model = tiny_model(local_attn_size=6, sink_size=1)
    model.attention_kernel = "triton"
    plain = few_step(model, 12, torch.float32)
    probe = StatsProbe(full_spec(model), Geometry(1, 12, FSL, TEXT_LEN), "cpu", mode="fused", kernel="triton")
    assert torch.equal(few_step(model, 12, torch.float32, probe), plain)
    assert not probe.missing_steps(12)


def test_two_calls_claiming_one_cell_is_an_error():
    """Values are placed by label, never by a count: a second call for the same (step, layer, frame) is refused."""
    model = tiny_model()
    probe = StatsProbe(CaptureSpec(layers=(0,), heads=(0,), steps=(0,)), Geometry(1, 3, FSL, TEXT_LEN), "cpu")
    x = torch.randn(1, C, 3, H, W)
    labels = ForwardLabels(step=0, timestep=1000.0, chunk=0)
    with attach(model, probe):
        model(x, torch.full((1,), 1000.0), torch.randn(1, TEXT_LEN, 32), labels=labels)
        with pytest.raises(WorkbenchError, match="two attention calls claim"):
            model(x, torch.full((1,), 1000.0), torch.randn(1, TEXT_LEN, 32), labels=labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_indicator_mode_equals_float64_reference():
    """"indicator" mode (the cuDNN call's value tensor widened with key-frame indicators), bf16 on the GPU: with
    eviction, the stored attn_mass equals the float64 reference of the q, k each call saw, NaN exactly outside
    the windows, and the rollout is bitwise the plain one. (On the CPU "indicator" is "exact".)"""
    dtype = torch.bfloat16
    model = tiny_model(local_attn_size=6, sink_size=1).cuda().to(dtype)
    model.attention_kernel = "cudnn-balanced"  # the kernel indicator mode reads (on sm90 "auto" is the Gluon forward)
    plain = few_step(model, 12, dtype)
    probe = StatsProbe(full_spec(model), Geometry(1, 12, FSL, TEXT_LEN), "cuda", mode="indicator",
                       kernel="cudnn-balanced")
    assert probe.mode == "indicator" and probe.computes_output
    assert StatsProbe(full_spec(model), Geometry(1, 12, FSL, TEXT_LEN), "cpu", mode="indicator").mode == "exact"
    rec = AttendRecorder(model, range(model.config.num_layers))
    captured = few_step(model, 12, dtype, probe)
    rec.remove()
    cfg = model.config
    exp = reference_from_records(rec, cfg.num_layers, cfg.num_heads, 12,
                                 lambda c: expected_key_frames(c, NFPB, cfg.local_attn_size, cfg.sink_size))
    # each query token's frame mass is rounded to the kernel's dtype (bf16: up to 2^-9 relative) before the mean
    # over a frame's tokens; with 6 tokens per frame little of that averages out (measured 8.8e-4 per cell here),
    # so bf16 is held to 2e-3; at the real model's 1560 tokens per frame tests/test_indicator.py holds 1e-3 on GPU
    tol = 2e-3
    assert_close_to_reference(probe.results()["attn_mass"][0], exp["attn_mass"], tol, "attn_mass")
    assert_close_to_reference(probe.results()["attn_logit"][0], exp["attn_logit"], TOL[dtype], "attn_logit")
    rows = np.nansum(probe.results()["attn_mass"][0], axis=-1)
    np.testing.assert_allclose(rows, 1.0, atol=tol)
    assert torch.equal(captured, plain)


def test_indicator_mode_falls_back_to_the_exact_path_where_it_cannot_serve():
    """Masked calls (block-causal full-sequence forward) and key-token layers take the exact path: the output
    there is bitwise the plain one and the statistics are the exact ones; "auto" is "exact" on the CPU."""
    model = tiny_model()
    frames = 6
    x, t, ctx = torch.randn(1, C, frames, H, W), torch.full((1,), 500.0), torch.randn(1, TEXT_LEN, 32)
    labels = ForwardLabels(step=0, timestep=500.0, chunk=0, phase="train")
    spec = CaptureSpec(layers=(0, 1), heads=(0, 1, 2, 3), steps=(0,),
                       stats=("attn_mass", "attn_logit", "attn_key_token"), token_layers=(1,))
    results = {}
    for mode in ("exact", "indicator"):
        probe = StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu", mode=mode)
        with attach(model, probe):
            results[mode] = (model(x, t, ctx, labels=labels), probe.results())
    assert torch.equal(results["exact"][0], results["indicator"][0])
    for name in ("attn_mass", "attn_key_token"):
        np.testing.assert_array_equal(results["exact"][1][name], results["indicator"][1][name])
    assert StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu", mode="auto").mode == "exact"
    with pytest.raises(WorkbenchError, match="capture mode 'fast'.*'indicator'"):
        StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu", mode="fast")


def test_probe_reset_and_graph_replay_bookkeeping():
    """The CUDA-graph protocol on its host side: the calls seen while recording are returned, and replaying them
    claims the same cells again; `reset()` empties the buffers in place; a probe reused without reset refuses
    the second rollout's calls (it would mix two rollouts' values)."""
    model = tiny_model()
    probe = StatsProbe(full_spec(model), Geometry(1, 6, FSL, TEXT_LEN), "cpu", mode="indicator")
    buffers = {name: buf.data_ptr() for name, buf in probe.buffers.items()}
    probe.begin_recording()
    first = few_step(model, 6, torch.float32, probe)
    calls = probe.end_recording()
    assert len(calls) == 2 * STEPS * model.config.num_layers  # 2 chunks x 5 forwards x layers (self only)
    values, filled = probe.results(), set(probe.filled)
    assert not probe.missing_steps(6)
    with pytest.raises(WorkbenchError, match="reset"):
        few_step(model, 6, torch.float32, probe)
    probe.reset()
    assert not probe.filled and all(np.isnan(v).all() for v in probe.results().values())
    assert {name: buf.data_ptr() for name, buf in probe.buffers.items()} == buffers
    probe.replay_recorded(calls)  # what a graph replay does on the host
    assert probe.filled == filled and probe.missing_steps(6) == []
    probe.reset()
    again = few_step(model, 6, torch.float32, probe)
    assert torch.equal(again, first)
    for name in values:
        np.testing.assert_array_equal(probe.results()[name], values[name])


def _gpu_few_step(model, probe, seed, graphs):
    """One bf16 few-step rollout of the tiny model on the GPU with `probe` attached (reset first)."""
    s = FlowMatchScheduler(5.0)
    g = torch.Generator(device="cuda").manual_seed(seed)
    noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
    ctx = torch.randn(1, TEXT_LEN, 32, generator=g, device="cuda").to(torch.bfloat16)
    probe.reset()
    with attach(model, probe):
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                               generator=g, cuda_graphs=graphs)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["indicator", "exact"])
def test_gpu_graphed_capture_equals_eager_capture(mode):
    """With a graph-safe probe attached the few-step rollout runs from CUDA graphs (warm-up, record, replay);
    each rollout's latents and store equal the eager rollout's bitwise, for several prompts/seeds, with
    eviction (sink + window)."""
    model = tiny_model(local_attn_size=6, sink_size=1).cuda().to(torch.bfloat16)
    model.attention_kernel = "cudnn-balanced"  # the kernel indicator mode reads (on sm90 "auto" is the Gluon forward)
    spec = CaptureSpec(layers=(0, 1), heads=(1, 3), steps=tuple(range(STEPS)), stats=("attn_mass", "attn_logit"))
    graphed = StatsProbe(spec, Geometry(1, 12, FSL, TEXT_LEN), "cuda", mode=mode, kernel="cudnn-balanced")
    eager = StatsProbe(spec, Geometry(1, 12, FSL, TEXT_LEN), "cuda", mode=mode, kernel="cudnn-balanced")

    def run(probe, seed, graphs):
        return _gpu_few_step(model, probe, seed, graphs), probe.results()

    for seed in range(4):  # rollout 0 warms up, 1 records, 2-3 replay
        a, sa = run(graphed, seed, True)
        b, sb = run(eager, seed, False)
        assert torch.equal(a, b), seed
        for name in sa:
            np.testing.assert_array_equal(sa[name], sb[name])
        assert not graphed.missing_steps(12)
    assert model._rollout_graphs is not None and model._rollout_graphs.observers == (graphed,)
    assert len(model._rollout_graphs.graphs) == 4 * STEPS  # one graph per forward when observers are attached


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_store_path_matches_exact_and_replays():
    """The model on its Triton kernel: a plain rollout, an "exact" capture and a "fused" capture (every head:
    the kernel writes attn_mass / attn_logit straight into the buffers) give bitwise the same latents, the
    fused store matches the exact one within bf16 (same inputs, so every cell), and the graphed rollouts
    repeat the eager one bitwise."""
    model = tiny_model().cuda().to(torch.bfloat16)
    model.attention_kernel = "triton"
    heads = tuple(range(model.config.num_heads))
    spec = CaptureSpec(layers=(0, 1), heads=heads, steps=tuple(range(STEPS)), stats=("attn_mass", "attn_logit"))

    def run(mode, graphs, probe=None):
        probe = probe or StatsProbe(spec, Geometry(1, 12, FSL, TEXT_LEN), "cuda", mode=mode, kernel="triton")
        return _gpu_few_step(model, probe, 3, graphs), probe.results(), probe

    s = FlowMatchScheduler(5.0)
    g = torch.Generator(device="cuda").manual_seed(3)
    noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
    ctx = torch.randn(1, TEXT_LEN, 32, generator=g, device="cuda").to(torch.bfloat16)
    plain = causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g)
    out_exact, exact, _ = run("exact", False)
    out0, fused, probe = run("fused", False)
    assert probe.mode == "fused" and probe.last_path == "fused-store"  # the last call took the store path
    assert torch.equal(out_exact, plain) and torch.equal(out0, plain)  # capture changes nothing
    model.attention_kernel = "auto"
    assert not torch.equal(_gpu_few_step(model, StatsProbe(spec, Geometry(1, 12, FSL, TEXT_LEN), "cuda",
                                                           mode="exact"), 3, False), plain)  # the check can fail
    model.attention_kernel = "triton"
    for name in ("attn_mass", "attn_logit"):
        a, b = exact[name], fused[name]  # [B, step, layer, head, query frame, key frame]
        assert (np.isnan(a) == np.isnan(b)).all() and (~np.isnan(a)).sum() > 0
        tol = 1e-3 if name == "attn_mass" else 1e-3 * np.nanmax(np.abs(a))
        assert np.nanmax(np.abs(a - b)) < tol
    for _ in range(3):  # warm-up, record, replay
        out, again, _ = run("fused", True, probe)
        assert torch.equal(out, out0)
        for name in again:
            np.testing.assert_array_equal(again[name], fused[name])


def test_a_probe_is_any_object_with_wants_and_observe():
    """workbench/hooks.py's promise: an object with wants and observe alone is a probe (it got an AttributeError for
    needs_lse); lse is None unless it asks for it."""
    seen = []

    class Duck:
        def wants(self, call):
            return call.layer == 1 and call.kind == "self"

        def observe(self, call, q, k, v, out, lse):
            seen.append((call.layer, tuple(q.shape), lse))

    model = tiny_model()
    plain = few_step(model, 6, torch.float32)
    assert torch.equal(few_step(model, 6, torch.float32, Duck()), plain)
    assert seen and all(layer == 1 and lse is None for layer, _, lse in seen)


def test_a_probes_heads_set_again_are_the_heads_it_selects():
    """`Probe.head_index` kept its index tensor per device only: `probe.heads = [2, 3]` after a first call went on
    selecting the first heads (a notebook cell that changes a probe's heads)."""
    from workbench.hooks import Probe

    probe, q = Probe(heads=[0, 1]), torch.zeros(1, 2, 4, 8)  # q [B, L, heads, head_dim]
    assert probe.head_index(q).tolist() == [0, 1]
    probe.heads = [2, 3]
    assert probe.head_index(q).tolist() == [2, 3]
    probe.heads = [0, 1, 2, 3]
    assert probe.head_index(q) is None  # (every head: no index)

"""The statistics registry (workbench/statistics.py) is the one definition of a statistic: docs/store.md, the
`--stats` help, the store's variables and the probe's buffers follow it. And the statistic added through it
alone, `attn_frame_entropy`, equals a float64 reference: on random inputs (masked and not, with the model
kernel's log-sum-exp or its own), and through a probe on windowed rollouts and the masked full-sequence
forward, cell by cell with the labels read independently of the probe (tests/attention_reference.py)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from attention_reference import AttendRecorder, dense_frame_entropy, expected_key_frames
from conftest import tiny_model
from models.common.attention import ForwardLabels
from models.common.rollout import causal_few_step
from models.common.scheduler import FlowMatchScheduler
from workbench.capture import CAPTURE_MODES, CaptureSpec, Geometry, StatsProbe
from workbench.errors import WorkbenchError
from workbench.hooks import attach
from workbench.statistics import DEFAULT_STATS, STATISTICS, check_stats, markdown_table, stats_help

DOC = Path(__file__).resolve().parents[1] / "docs" / "store.md"
C, H, W, FSL, NFPB, TEXT_LEN, STEPS = 16, 4, 6, 6, 3, 16, 5


# ------------------------------------------------------------------------------------------------------
# One definition, read everywhere


def test_docs_list_exactly_the_registry():
    text = DOC.read_text()
    table = re.search(r"<!-- statistics: generated from workbench/statistics.py -->\n(.*?)\n<!-- end statistics -->",
                      text, re.S)
    assert table, "docs/store.md lost its statistics table markers"
    assert table.group(1) == markdown_table(), "docs/store.md's table is stale: paste `python -m workbench.statistics`"
    sections = dict(re.findall(r"^### `(\w+)` \(([^)]*)\)", text, re.M))
    want = {name: ", ".join(s.dims) for name, s in STATISTICS.items()}
    assert sections == want, "each statistic needs one '### `name` (dims)' section in docs/store.md"


def test_cli_help_and_store_follow_the_registry(capsys):
    from workbench.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in STATISTICS:
        assert name in text
    assert " ".join(stats_help().split()) in text and "default: attn_mass,attn_logit" in text
    assert DEFAULT_STATS == ("attn_mass", "attn_logit")
    extract = build_parser()._subparsers._group_actions[0].choices["extract"]
    choices = {a.dest: a.choices for a in extract._actions if a.choices}
    assert tuple(choices["capture_mode"]) == CAPTURE_MODES
    from models.common.attention_kernels import ATTENTION_KERNELS

    assert tuple(choices["attention_kernel"]) == ATTENTION_KERNELS


@pytest.mark.parametrize("stats,token_layers,message", [
    (("attn_mass", "attn_entropy"), (), r"unknown statistic\(s\) \['attn_entropy'\]; known: \['attn_mass'"),
    ((), (), "no statistic to capture; choose from"),
    (("attn_key_token",), (), "attn_key_token needs --token-layers"),
    (("attn_key_token",), (5,), r"token layers \[5\] are not among the captured layers \[0, 1\]"),
    (("attn_mass",), (1,), r"--token-layers \[1\] names the layers of attn_key_token, which --stats attn_mass does "
                           r"not ask for: add it \(e.g. --stats attn_mass,attn_key_token\)"),  # (it was ignored)
])
def test_one_validation(stats, token_layers, message):
    with pytest.raises(WorkbenchError, match=message):
        check_stats(stats, token_layers, layers=(0, 1))
    with pytest.raises(WorkbenchError, match=message):
        CaptureSpec(layers=(0, 1), heads=(0,), steps=(0,), stats=stats, token_layers=token_layers)


def test_a_statistic_of_ones_own_registered_again_replaces_itself_only_when_asked():
    """A notebook cell that registers a statistic, run again, raised "registered already" with no way on but a new
    kernel: `replace=True` replaces one's own statistic (as intervention kinds allow); a built-in one never."""
    import dataclasses

    from workbench import statistics

    mine = dataclasses.replace(statistics.get("attn_mass"), name="test_own_again", default=False)
    try:
        statistics.register(mine)
        with pytest.raises(ValueError, match=r"'test_own_again' is registered already \(or register\(\.\.\., "
                                             r"replace=True\)"):
            statistics.register(dataclasses.replace(mine, long_name="changed"))
        statistics.register(dataclasses.replace(mine, long_name="changed"), replace=True)
        assert statistics.get("test_own_again").long_name == "changed"
        with pytest.raises(ValueError, match=r"^statistic 'attn_mass' is registered already$"):
            statistics.register(dataclasses.replace(statistics.get("attn_mass"), long_name="x"), replace=True)
        assert statistics.get("attn_mass").long_name != "x"
    finally:
        statistics.STATISTICS.pop("test_own_again", None)


def test_probe_buffers_and_store_variables_take_the_registry_dims():
    from workbench.store import StoreLayout, sample_dataset

    spec = CaptureSpec(layers=(0, 1), heads=(0, 2), steps=(0, 4), stats=tuple(STATISTICS), token_layers=(1,))
    probe = StatsProbe(spec, Geometry(1, 6, FSL, TEXT_LEN), "cpu")
    sizes = dict(step=2, layer=2, token_layer=1, head=2, query_frame=6, key_frame=6, key_token=6 * FSL,
                 text_token=TEXT_LEN)
    for name, stat in STATISTICS.items():
        assert probe.buffers[name].shape == (1, *(sizes[d] for d in stat.dims[1:])), name
    layout = StoreLayout(steps=[ForwardLabels(0, 1000.0, 0), ForwardLabels(4, 0.0, 0, "context")], layers=[0, 1],
                         heads=[0, 2], token_layers=[1], num_frames=6, num_frame_per_block=3, frame_seq_len=FSL,
                         grid=(2, 3), text_len=TEXT_LEN, stats=list(STATISTICS), attrs={})
    sample = dict(prompt_index=0, seed=1, prompt="p", checkpoint="c", checkpoint_sha256="s", model_family="wan",
                  sampler="causal_few_step", local_attn_size=-1, sink_size=0, tokens=[""] * TEXT_LEN, num_tokens=1)
    ds = sample_dataset(layout, sample, {n: v[0] for n, v in probe.results().items()})
    for name, stat in STATISTICS.items():
        assert ds[name].dims == stat.dims and ds[name].attrs == stat.attrs


# ------------------------------------------------------------------------------------------------------
# attn_frame_entropy against float64


def _qkv(B, H_, D, fsl, nqf, nkf, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, nqf * fsl, H_, D, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    k = torch.randn(B, nkf * fsl, H_, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("kernel_lse", [False, True], ids=["own-lse", "kernel-lse"])
def test_frame_entropy_equals_float64_reference(dtype, tol, masked, kernel_lse, monkeypatch):
    from models.common.attention_kernels import attention_with_lse
    from workbench import reductions
    from workbench.kernels import reference

    monkeypatch.setattr(reference, "_KEY_BLOCK_TOKENS", 40)  # several key blocks per query frame
    B, H_, D, fsl, nqf, nkf = 2, 3, 16, 10, 3, 7
    q, k = _qkv(B, H_, D, fsl, nqf, nkf, dtype, seed=nkf + masked)
    mask = None
    if masked:  # a window with a sink, and a query frame left with one key frame
        mask = torch.zeros(nqf, nkf, dtype=torch.bool)
        mask[0, [0, 4, 5]] = True
        mask[1, [0, 5, 6]] = True
        mask[2, 6] = True
    lse = None
    if kernel_lse:  # the log-sum-exp the model's kernel gives a probe: float32 whatever the inputs
        lse = attention_with_lse(q, k, k, frame_mask=mask, frame_seq_len=fsl)[1]
        tol = max(tol, 1e-6)
    got = reductions.frame_entropy(q, k, lse, fsl, mask)
    want = dense_frame_entropy(q, k, fsl, mask)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (B, H_, nqf)
    assert (got.double() - want).abs().max() <= tol
    assert (want - want.roll(1, dims=1)).abs().max() > 1e-2  # heads differ: a swapped head would show
    if masked:
        assert want[:, :, 2].abs().max() <= 1e-12  # one attended key frame: no spread
        assert (want[:, :, :2] <= np.log(3) + 1e-9).all()
        assert (got[:, :, 2] >= 0).all()  # (never below 0 by rounding either)


def test_frame_entropy_is_never_below_zero_by_rounding():
    """A query frame whose tokens attend to one key frame has entropy 0, but in float32 a token's summed mass
    can round to 1 + 1e-7, and -p ln p then to -1e-7: each token's entropy is held at 0 or above."""
    from workbench import reductions
    from workbench.kernels import reference

    fsl, nkf = 64, 3
    q, k = _qkv(1, 12, 16, fsl, 1, nkf, torch.float32, seed=3)
    mask = torch.zeros(1, nkf, dtype=torch.bool)
    mask[0, 1] = True
    got = reductions.frame_entropy(q, k, None, fsl, mask)  # [B, H, 1]
    assert (got >= 0).all() and got.max() <= 1e-6
    lse = reference.row_lse_reference(q, k, frame_seq_len=fsl, allowed=mask)  # [B, H, Lq]
    wrong = reductions.frame_entropy(q, k, lse - 0.5, fsl, mask)  # (a wrong log-sum-exp: mass e^0.5 on the frame)
    torch.testing.assert_close(wrong, torch.full_like(wrong, -0.5 * math.exp(0.5)))  # (not hidden as 0)
    slightly = reductions.frame_entropy(q, k, lse - 1e-3, fsl, mask)  # (-1e-3: far beyond float32 rounding)
    torch.testing.assert_close(slightly, torch.full_like(slightly, -1e-3 * math.exp(1e-3)), rtol=1e-3, atol=1e-7)


def test_entropy_is_not_the_entropy_of_the_mean():
    """Two query tokens, one fully on key frame 0 and one fully on key frame 1: the statistic is 0 (each token
    is focused) while the entropy of their mean mass (0.5, 0.5) is ln 2."""
    from workbench import reductions

    fsl, D = 2, 4
    k = torch.zeros(1, 2 * fsl, 1, D, dtype=torch.float64)
    k[0, :fsl, 0, 0], k[0, fsl:, 0, 1] = 1.0, 1.0  # frame 0 along e0, frame 1 along e1
    q = torch.zeros(1, fsl, 1, D, dtype=torch.float64)
    q[0, 0, 0, 0], q[0, 1, 0, 1] = 200.0, 200.0  # token 0 looks at frame 0, token 1 at frame 1
    ent = reductions.frame_entropy(q, k, None, fsl)
    assert ent.abs().max() < 1e-12
    mass = reductions.frame_mass(q, k, None, fsl)
    assert torch.allclose(mass, torch.full_like(mass, 0.5))


def _few_step(model, frames, probe):
    g = torch.Generator().manual_seed(0)
    noise, ctx = torch.randn(1, frames, C, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    s = FlowMatchScheduler(5.0)
    with attach(model, probe):
        causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g)


@pytest.mark.parametrize("window", [dict(), dict(local_attn_size=6, sink_size=1)], ids=["global", "sink_window"])
def test_probe_entropy_equals_float64_reference_in_a_rollout(window, one_thread):
    """Every cell, labelled by the module path and visit order, against the float64 entropy of the q and k the
    call saw; with eviction in the windowed rollout."""
    model = tiny_model(**window)
    cfg, frames = model.config, 12
    spec = CaptureSpec(layers=tuple(range(cfg.num_layers)), heads=(0, 2, 3), steps=tuple(range(STEPS)),
                       stats=("attn_frame_entropy",))
    probe = StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu")
    rec = AttendRecorder(model, range(cfg.num_layers))
    _few_step(model, frames, probe)
    rec.remove()
    got = probe.results()["attn_frame_entropy"][0]  # [S, L, h, F]
    assert not np.isnan(got).any()
    exp = np.full_like(got, np.nan, dtype=np.float64)
    for layer, calls in rec.records.items():
        for visit, (q, k, _) in enumerate(calls):
            chunk, step = divmod(visit, STEPS)
            assert k.shape[1] == len(expected_key_frames(chunk, NFPB, cfg.local_attn_size, cfg.sink_size)) * FSL
            ent = dense_frame_entropy(q, k, FSL)[0][[0, 2, 3]]  # [h, nqf]
            exp[step, layer][:, chunk * NFPB:(chunk + 1) * NFPB] = ent.numpy()
    assert np.abs(got - exp).max() <= 2e-6
    assert np.abs(np.diff(exp, axis=-1)).max() > 1e-2 and np.abs(np.diff(exp, axis=0)).max() > 1e-2


def test_probe_entropy_on_the_masked_full_sequence_forward(one_thread):
    model = tiny_model(local_attn_size=6, sink_size=1)
    frames = 12
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, C, frames, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    spec = CaptureSpec(layers=(0, 1), heads=(0, 1, 2, 3), steps=(0,), stats=("attn_mass", "attn_frame_entropy"))
    probe = StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu")
    rec = AttendRecorder(model, [0, 1])
    with attach(model, probe):
        model(x, torch.full((1, frames), 500.0), ctx, labels=ForwardLabels(step=0, timestep=500.0, chunk=0,
                                                                            phase="train"))
    rec.remove()
    allowed = model.block_causal_mask(frames)
    for layer in (0, 1):
        (q, k, call), = rec.records[layer]
        assert torch.equal(call.frame_mask, allowed)
        want = dense_frame_entropy(q, k, FSL, allowed)[0].numpy()
        got = probe.results()["attn_frame_entropy"][0, 0, layer]
        assert np.abs(got - want).max() <= 2e-6
        unmasked = dense_frame_entropy(q, k, FSL)[0].numpy()
        assert np.abs(unmasked - want).max() > 1e-2  # the mask matters


def test_entropy_request_takes_the_exact_path_in_a_kernel_mode(monkeypatch):
    """No mode's kernel pass makes the entropy, so a call that needs it goes to the exact path before any kernel is
    looked at; with attn_mass alone the probe asks the kernel table whether its mode's kernel runs the call."""
    import workbench.capture as capture_mod
    from models.common.attention import AttentionCall

    asked = []

    def select(*args, **kwargs):
        asked.append(kwargs["kernel"])
        raise LookupError("the kernel path")

    monkeypatch.setattr(capture_mod, "select", select)
    call = AttentionCall(0, "self", ForwardLabels(0, 1000.0, 0), (0, 1, 2), (0, 1, 2), FSL, (2, 3), None, 4, 8, "triton")
    q = torch.randn(1, 3 * FSL, 4, 8)
    for stats, kernel_path in ((("attn_mass", "attn_frame_entropy"), False), (("attn_mass",), True)):
        spec = CaptureSpec(layers=(0,), heads=(0, 1, 2, 3), steps=(0,), stats=stats)
        probe = StatsProbe(spec, Geometry(1, 3, FSL, TEXT_LEN), "cpu", mode="fused", kernel="triton")
        asked.clear()
        if kernel_path:
            with pytest.raises(LookupError):
                probe.compute(call, q, q, q)
            assert asked == ["triton"]
        else:
            assert probe.compute(call, q, q, q) is None and not asked


@pytest.mark.parametrize("rows", [5, 7, 24, 4096])
def test_cross_mass_in_blocks_of_any_size_equals_float64_reference(rows):
    """cross_mass reduces blocks of `rows` query tokens: blocks that cut frames, and frames after the first block,
    keep their own frame index (the rollout's calls span several blocks; tests gave one)."""
    from attention_reference import dense_cross_mass
    from workbench.reductions import cross_mass

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 24, 3, 8, generator=g), torch.randn(2, 7, 3, 8, generator=g)  # 6 frames of 4 tokens
    got = cross_mass(q, k, 4, rows=rows)  # [B, H, nqf, T]
    assert got.shape == (2, 3, 6, 7)
    assert (got.double() - dense_cross_mass(q, k, 4)).abs().max() < 1e-6


def test_mean_logit_keeps_float64_where_the_means_cancel():
    """attn_logit = mean_q . mean_k / sqrt(d) from float32 q, k whose means are large and nearly orthogonal: the
    float64 means and dot products keep it to float32 rounding of the result (float32 arithmetic lost ~1e-3)."""
    from workbench.reductions import mean_logit

    g = torch.Generator().manual_seed(0)
    d, fsl = 64, 16
    sign = torch.tensor([1.0, -1.0]).repeat(d // 2)  # [d]: q and k means orthogonal up to the noise
    q = (300.0 + torch.randn(1, 2 * fsl, 2, d, generator=g)).float()  # [B, Lq, H, D]
    k = (300.0 * sign + torch.randn(1, 3 * fsl, 2, d, generator=g)).float()
    qm = q.double().reshape(1, 2, fsl, 2, d).mean(2).permute(0, 2, 1, 3)  # [B, H, nqf, D], from the float32 inputs
    km = k.double().reshape(1, 3, fsl, 2, d).mean(2).permute(0, 2, 1, 3)
    want = qm @ km.transpose(-1, -2) / math.sqrt(d)
    got = mean_logit(q, k, fsl)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 1e-5 * max(1.0, want.abs().max())

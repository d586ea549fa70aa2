"""`workbench export-legacy`: the researchers' old per-layer .pt layout (workbench/legacy.py describes it).

The exported matrix is compared with the fork's own algorithm run on the token-level logits of the q, k the
model used (recorded by module path): sort the captures by key length, take the first capture of each chunk
(step 0, t = 1000), mean the logits over each frame pair's token pairs, leave 0 elsewhere.
"""

import numpy as np
import pytest
import torch

from attention_reference import recording_extract
from workbench.cli import main as cli_main
from workbench.extract import ExtractConfig, run_extract
from workbench.legacy import export_legacy
from workbench.store import open_store

F, FSL, HEADS = 21, 48, 4
KEYS = {"layer_index", "full_frame_attention", "last_block_frame_attention", "is_logits", "prompt", "num_frames",
        "frame_seq_length", "num_frame_per_block", "num_heads", "block_sizes", "query_frames", "key_frames",
        "last_block_query_frames"}
PROMPTS = ["a red fox running through fresh snow", "a small blue boat on a misty lake"]


def quiet(*a, **kw):
    pass


def fork_full_frame_attention(calls, block_sizes, fsl):
    """run_extraction_each.py, steps 2-3, on recorded (q, k, call) of one layer: float64, then float32 like the fork."""
    num_frames = sum(block_sizes)
    full = torch.zeros(calls[0][0].shape[2], num_frames, num_frames, dtype=torch.float64)
    by_k = sorted(calls, key=lambda c: c[1].shape[1])  # stable: the first of each key length is chronologically first
    used, q_start = set(), 0
    for b, size in enumerate(block_sizes):
        want = sum(block_sizes[: b + 1])
        q, k, _ = next(c for c in by_k if c[1].shape[1] // fsl == want and want not in used)
        used.add(want)
        logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())[0] / q.shape[-1] ** 0.5  # [H, Lq, Lk]
        nq, nk = logits.shape[1] // fsl, logits.shape[2] // fsl
        full[:, q_start:q_start + nq, :nk] = logits.reshape(-1, nq, fsl, nk, fsl).mean(dim=(2, 4))
        q_start += size
    return full.float()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Layers 2 and 3, two samples, float32; the q, k of layer 3 recorded by module path."""
    out = tmp_path_factory.mktemp("legacy") / "layers.zarr"
    with recording_extract([3]) as recorders:
        run_extract(ExtractConfig(layers=[2, 3], prompts=PROMPTS, seeds=[42], out=str(out), progress=False), log=quiet)
    calls = recorders[0].records[3]
    return out, calls[: len(calls) // 2]  # sample p0000-s42's 35 calls (the second sample's follow)


def test_files_match_the_fork_layout_and_its_algorithm(store, tmp_path):
    path, calls = store
    paths = export_legacy(path, tmp_path / "legacy", log=quiet)
    assert sorted(p.relative_to(tmp_path / "legacy").as_posix() for p in paths) == [
        "p0000-s42/layer2.pt", "p0000-s42/layer3.pt", "p0001-s42/layer2.pt", "p0001-s42/layer3.pt"]
    data = torch.load(tmp_path / "legacy" / "p0000-s42" / "layer3.pt", weights_only=True)
    assert KEYS <= set(data)
    full, last = data["full_frame_attention"], data["last_block_frame_attention"]
    assert full.dtype == last.dtype == torch.float16
    assert full.shape == (HEADS, F, F) and last.shape == (HEADS, F)
    assert data["is_logits"] is True and data["layer_index"] == 3 and data["prompt"] == PROMPTS[0]
    assert (data["num_frames"], data["frame_seq_length"], data["num_frame_per_block"], data["num_heads"]) == (F, FSL, 3, HEADS)
    assert data["block_sizes"] == [3] * 7  # 7 chunks of 3 (independent_first_frame False)
    assert data["query_frames"] == data["key_frames"] == list(range(F))
    assert data["last_block_query_frames"] == [18, 19, 20]
    assert (data["step"], data["timestep"], data["head_indices"]) == (0, 1000.0, [0, 1, 2, 3])
    assert data["use_ema"] is True  # the embedded default, the zoo's DMD student, runs its generator_ema
    # the fork's algorithm on the token-level logits, within fp16 rounding
    fork = fork_full_frame_attention(calls, data["block_sizes"], FSL)
    torch.testing.assert_close(full.float(), fork, rtol=1e-3, atol=2e-3)
    assert (full.float() - fork).abs().max() < 0.01 * fork.abs().max()
    # exactly the store's attn_logit at step 0, NaN -> 0, in fp16
    ds = open_store(path)
    store_logit = ds.attn_logit.sel(sample="p0000-s42", layer=3, step=0).values
    assert torch.equal(full, torch.from_numpy(np.nan_to_num(store_logit, nan=0.0)).half())
    # and not another layer's or step's (the checks above could tell)
    for other in (ds.attn_logit.sel(sample="p0000-s42", layer=2, step=0), ds.attn_logit.sel(sample="p0000-s42", layer=3, step=1)):
        assert np.nanmax(np.abs(other.values - store_logit)) > 0.05


def test_staircase_zeros_and_last_block(store, tmp_path):
    path, _ = store
    (p,) = export_legacy(path, tmp_path, layers=[2], samples=["p0001-s42"], log=quiet)
    data = torch.load(p, weights_only=True)
    full = data["full_frame_attention"].float()
    assert not torch.isnan(full).any()
    qf, kf = torch.meshgrid(torch.arange(F), torch.arange(F), indexing="ij")
    above = kf >= (qf // 3 + 1) * 3  # future chunks: never attended, stored as 0
    assert (full[:, above] == 0).all()
    assert (full[:, ~above] != 0).all()  # the diagonal 3x3 blocks and everything below are filled
    last32 = torch.from_numpy(np.nan_to_num(open_store(path).attn_logit.sel(sample="p0001-s42", layer=2, step=0).values))
    assert torch.equal(data["last_block_frame_attention"], last32[:, 18:21].mean(dim=1).half())  # item 25
    assert data["prompt"] == PROMPTS[1] and data["layer_index"] == 2


def test_windowed_store_exports_zeros_for_evicted_frames(tmp_path):
    out = tmp_path / "w.zarr"
    run_extract(ExtractConfig(layers=[1], local_attn_size=9, sink_size=3, out=str(out), progress=False), log=quiet)
    (p,) = export_legacy(out, log=quiet)
    assert p == tmp_path / "w_legacy" / "p0000-s42" / "layer1.pt"
    full = torch.load(p, weights_only=True)["full_frame_attention"].float()
    assert not torch.isnan(full).any()
    assert (full[:, 20, 3:15] == 0).all() and (full[:, 20, :3] != 0).all() and (full[:, 20, 15:] != 0).all()


def test_cli_writes_files_and_refuses_bad_requests(store, tmp_path, capsys):
    path, _ = store
    out = tmp_path / "cli"
    assert cli_main(["export-legacy", str(path), "--out", str(out), "--layers", "3"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pt")) == ["p0000-s42/layer3.pt", "p0001-s42/layer3.pt"]
    for args, message in ((["--layers", "9"], "layer [9] not in"), (["--samples", "p0000-s7"], "sample ['p0000-s7'] not in"),
                          (["--step", "7"], "step 7 not in")):
        assert cli_main(["export-legacy", str(path), "--out", str(tmp_path / "bad"), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # checked before the first file
    assert cli_main(["export-legacy", str(tmp_path / "missing.zarr")]) == 2
    assert "no store at" in capsys.readouterr().err
    mass_only = tmp_path / "mass.zarr"
    run_extract(ExtractConfig(layers=[0], stats=["attn_mass"], out=str(mass_only), progress=False), log=quiet)
    assert cli_main(["export-legacy", str(mass_only)]) == 2
    assert "has no attn_logit" in capsys.readouterr().err


def test_a_training_probe_store_exports_one_train_step(tmp_path, capsys):
    """A probe store (a train_step dim) exports the train step asked for, files as an extract store's at that
    step; without --train-step, or with one it does not hold, a clear error before any file."""
    from test_reports import probe_store

    path = probe_store(tmp_path / "probes.zarr")
    assert cli_main(["export-legacy", str(path), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "training probe store (choose one: --train-step N); it holds train steps [0, 2, 4]" in err
    assert cli_main(["export-legacy", str(path), "--train-step", "3", "--out", str(tmp_path / "none")]) == 2
    assert "train step 3 is not in it" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    out = tmp_path / "t2"
    assert cli_main(["export-legacy", str(path), "--train-step", "2", "--layers", "1", "--out", str(out)]) == 0
    one = open_store(path).sel(train_step=2)
    for sample in [str(s) for s in one.sample.values]:
        data = torch.load(out / sample / "layer1.pt", weights_only=True)
        heads, F = one.sizes["head"], one.sizes["query_frame"]
        assert data["full_frame_attention"].shape == (heads, F, F)
        assert data["last_block_frame_attention"].shape == (heads, F)
        expected = one.attn_logit.sel(sample=sample, layer=1, step=0).fillna(0).values
        np.testing.assert_allclose(data["full_frame_attention"].float().numpy(), expected, atol=2e-3, rtol=1e-3)


def test_help_teaches(capsys):
    assert cli_main(["export-legacy", "--help"]) == 0
    text = capsys.readouterr().out
    assert "weights_only=True" in text and "full_frame_attention" in text and "examples:" in text


def test_a_cfg_stores_files_name_their_branch(tmp_path):
    """A CFG store's steps come in pairs at one timestep (cond, uncond): a file of either named only its step and
    timestep, so two files differing in branch read the same (found by QA). Each records `phase` and `cfg`, and the
    "wrote" line names the branch."""
    from studies import synthetic

    store = synthetic.write_store(tmp_path / "wan.zarr", "bidirectional", layers=(0,), num_heads=2, seeds=(2,))
    said = []
    for step, branch in ((0, "cond"), (1, "uncond")):
        path, = export_legacy(store, tmp_path / f"step{step}", step=step, log=said.append)
        data = torch.load(path, weights_only=True)
        assert (data["step"], data["timestep"], data["phase"], data["cfg"]) == (step, 1000.0, "denoise", branch)
        assert f"(step {step}, t = 1000, {branch} branch)" in said[-1]


def test_a_few_step_stores_files_record_their_phase_and_no_branch(tmp_path, monkeypatch):
    """A few-step store's context step (its last) records phase 'context' and cfg 'none', and the "wrote" line names
    no branch there; a store made before phase and cfg were recorded exports as before, without them."""
    from studies import synthetic
    from workbench import legacy

    store = synthetic.write_store(tmp_path / "sf.zarr", "causal", layers=(0,), num_heads=2, seeds=(2,))
    said = []
    for step, phase in ((0, "denoise"), (4, "context")):
        path, = export_legacy(store, tmp_path / f"step{step}", step=step, log=said.append)
        data = torch.load(path, weights_only=True)
        assert (data["step"], data["phase"], data["cfg"]) == (step, phase, "none")
        assert f"(step {step}, t = {data['timestep']:g}): 1 sample(s)" in said[-1] and "branch" not in said[-1]
    real = legacy.open_store
    monkeypatch.setattr(legacy, "open_store", lambda path: real(path).drop_vars(["phase", "cfg"]))
    path, = export_legacy(store, tmp_path / "old", step=0, log=said.append)
    data = torch.load(path, weights_only=True)
    assert "phase" not in data and "cfg" not in data and data["step"] == 0 and "branch" not in said[-1]

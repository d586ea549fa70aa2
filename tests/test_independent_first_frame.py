"""`independent_first_frame`: frame 0 is a chunk of its own, then chunks of 3 (the researchers'
extraction layout, block_sizes [1, 3, 3, 3, 3, 3, 3] for 19 frames and full_frame_attention [12, 19, 19]).

Through the stack: the layout and its errors, the block-causal mask, KV-cache rollout == full-sequence forward,
every sampler's chunks, capture labels and key windows on the 1.3B geometry (meta device), stores and
export-legacy on the 1.3B layout and with real values on the embedded model, studies, and training.
"""

import json

import numpy as np
import pytest
import torch

from attention_reference import recording_extract
from conftest import tiny_model
from models.common.chunks import block_sizes, chunk_spans, frame_chunks
from models.common.kv_cache import RolloutCache
from models.common.rollout import causal_few_step, sample
from models.common.scheduler import FlowMatchScheduler
from models.errors import ModelInputError
from models.wan.config import VideoGeometry, preset
from models.wan.model import WanModel
from test_export_legacy import fork_full_frame_attention
from workbench.cli import main as cli_main
from workbench.extract import ExtractConfig, plan, run_extract, store_layout
from workbench.hooks import CallFilter, Probe, attach
from workbench.legacy import export_legacy
from workbench.store import StoreWriter, open_store, sample_dataset

B, C, H, W = 2, 16, 4, 6  # 2 x 3 = 6 tokens per frame
LAYOUT_19 = [1, 3, 3, 3, 3, 3, 3]


def quiet(*a, **kw):
    pass


def test_layout_and_its_errors():
    assert block_sizes(19, 3, True) == LAYOUT_19 and sum(LAYOUT_19) == 19
    assert block_sizes(21, 3) == [3] * 7
    assert chunk_spans(7, 3, True) == [(0, 1), (1, 3), (4, 3)]
    assert frame_chunks(7, 3, True) == [0, 1, 1, 1, 2, 2, 2]
    assert [sum(LAYOUT_19[: b + 1]) for b in range(7)] == [1, 4, 7, 10, 13, 16, 19]  # cumulative key frames
    with pytest.raises(ModelInputError, match=r"1 \+ 3k frames, e.g. 19 or 22"):
        block_sizes(21, 3, True)
    with pytest.raises(ModelInputError, match=r"multiple of 3, or 1 \+ 3k frames with independent_first_frame"):
        block_sizes(19, 3)
    with pytest.raises(ModelInputError, match="1 \\+ 3k"):
        VideoGeometry(num_frames=21, independent_first_frame=True)
    assert VideoGeometry(num_frames=19, independent_first_frame=True).num_chunks == 7


def test_block_causal_mask():
    model = tiny_model()
    model.independent_first_frame = True
    chunk = torch.tensor(frame_chunks(7, 3, True))
    assert torch.equal(model.block_causal_mask(7), chunk[None, :] <= chunk[:, None])
    assert model.block_causal_mask(7)[0].tolist() == [True] + [False] * 6  # frame 0 sees only itself
    windowed = tiny_model(local_attn_size=4, sink_size=1)
    windowed.independent_first_frame = True
    # frame 9's chunk is 7-9: the cache holds the sink (0) and the 3 most recent frames
    assert windowed.block_causal_mask(10)[9].tolist() == [True] + [False] * 6 + [True] * 3


def incremental(model, x, t, ctx, repeats=2):
    """Chunk by chunk through the KV cache (the model's own chunks); each chunk `repeats` times."""
    frames = x.shape[2]
    cache = RolloutCache.allocate(model.config, B, frames, (H // 2) * (W // 2), dtype=x.dtype, device=x.device)
    outs = []
    for start, n in model.chunk_spans(frames):
        for _ in range(repeats):
            out = model(x[:, :, start : start + n], t[:, start : start + n], ctx, cache=cache, start_frame=start)
        outs.append(out)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("window", [dict(), dict(local_attn_size=5, sink_size=1)])
def test_kv_cache_rollout_equals_full_sequence_block_causal_forward(window, one_thread):
    model = tiny_model(**window)
    model.independent_first_frame = True
    g = torch.Generator().manual_seed(0)
    frames = 10
    x, t = torch.randn(B, C, frames, H, W, generator=g), torch.rand(B, frames, generator=g) * 1000
    ctx = torch.randn(B, 16, 32, generator=g)
    full = model(x, t, ctx)
    inc = incremental(model, x, t, ctx)
    assert ((inc - full).norm() / full.norm()).item() <= 1e-5
    model.independent_first_frame = False  # the layout matters: chunks of 3 from frame 0 give another forward
    with pytest.raises(ModelInputError, match="chunks of 3"):
        model(x, t, ctx)
    other = model(x[:, :, :9], t[:, :9], ctx)
    assert ((other - full[:, :, :9]).norm() / full.norm()).item() > 1e-3


@pytest.mark.gpu
def test_gpu_kv_cache_rollout_and_cuda_graphs_on_the_layout(monkeypatch):
    """On CUDA: the KV-cache forward equals the full-sequence block-causal forward (float32, CUDA attention
    kernels), and a bf16 few-step rollout replayed from CUDA graphs (a 1-frame chunk, then chunks of 3) equals
    the eager rollout bitwise."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch conv: fp32 in both forwards
    model = tiny_model(local_attn_size=5, sink_size=1).cuda()
    model.independent_first_frame = True
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, C, 10, H, W, generator=g, device="cuda")
    t = torch.rand(B, 10, generator=g, device="cuda") * 1000
    ctx = torch.randn(B, 16, 32, generator=g, device="cuda")
    full = model(x, t, ctx)
    inc = incremental(model, x, t, ctx)
    assert ((inc - full).norm() / full.norm()).item() <= 1e-4
    model = model.to(torch.bfloat16)
    noise = torch.randn(1, 7, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
    s = FlowMatchScheduler(5.0)

    def rollout(graphs):
        return causal_few_step(model, noise, ctx[:1].to(torch.bfloat16), timesteps=s.warp([1000, 750, 500, 250]),
                               scheduler=s, generator=torch.Generator(device="cuda").manual_seed(1), cuda_graphs=graphs)

    eager = rollout(False)
    for _ in range(3):  # eager on the graphs' cache, record, replay
        graphed = rollout(True)
    assert torch.equal(graphed, eager) and torch.isfinite(eager).all()


@pytest.mark.parametrize("sampler", ["causal_few_step", "causal_multi_step_cfg"])
def test_every_causal_sampler_runs_the_layout(sampler, one_thread):
    model = tiny_model()
    model.independent_first_frame = True
    g = torch.Generator().manual_seed(0)
    noise, ctx, neg = torch.randn(1, 7, C, H, W, generator=g), torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    forwards, chunks = [], []
    out = sample(model, sampler, noise, ctx, neg, generator=g, num_inference_steps=2,
                 on_forward=lambda labels, start, n: forwards.append((labels.chunk, start, n)),
                 on_chunk=lambda chunk, start, x0: chunks.append((chunk, start, x0.shape[1])))
    assert chunks == [(0, 0, 1), (1, 1, 3), (2, 4, 3)]
    assert sorted(set(forwards)) == chunks
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ModelInputError, match="1 \\+ 3k"):
        sample(model, sampler, torch.randn(1, 9, C, H, W), ctx, neg, num_inference_steps=2)


def record_calls(model, layer):
    calls = []
    probe = Probe(CallFilter(layers={layer}, kinds={"self"}), fn=lambda call, *rest: calls.append(call))
    return probe, calls


def test_labels_on_the_13b_geometry_meta_device():
    """The 1.3B geometry (12 heads, 1560 tokens per frame, 19 latent frames; one layer: the labels do not depend
    on depth) on the meta device: chunk labels, query frames and the key windows of the researchers' layout."""
    with torch.device("meta"):
        model = WanModel(preset("wan2.1-t2v-1.3b", num_layers=1), causal=True, independent_first_frame=True)
    noise, ctx = torch.empty(1, 19, 16, 60, 104, device="meta"), torch.empty(1, 512, 4096, device="meta")
    s = FlowMatchScheduler(5.0)
    probe, calls = record_calls(model, 0)
    with attach(model, probe):
        causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s)
    first = [c for c in calls if c.labels.step == 0]  # the fork's capture: t = 1000, first forward of each chunk
    assert [len(c.query_frames) for c in first] == LAYOUT_19
    assert [c.labels.chunk for c in first] == list(range(7))
    assert [len(c.key_frames) for c in first] == [1, 4, 7, 10, 13, 16, 19]
    assert all(c.key_frames == tuple(range(c.query_frames[-1] + 1)) for c in first)
    assert {c.frame_seq_len for c in calls} == {1560} and {c.num_heads for c in calls} == {12}
    assert len(calls) == 7 * 5  # 7 chunks x (4 steps + the context pass)


def test_store_and_export_legacy_on_the_13b_layout(tmp_path):
    """A store laid out by extract's own code for the 1.3B folder with --independent-first-frame, the cells of
    each chunk's key window (from the meta-device rollout's labels) filled, exported to the fork's files."""
    folder = tmp_path / "wan13b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset("wan2.1-t2v-1.3b").to_json_dict()))
    # (plan checks the weights file is there and whole; reads no tensor: a safetensors file of none)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}      ")
    p = plan(ExtractConfig(wan_dir=str(folder), num_frames=19, independent_first_frame=True, layers=[3], steps=[0],
                           stats=["attn_mass", "attn_logit"]))
    layout = store_layout(p, {"frame_seq_len": p.frame_seq_len, "num_frame_per_block": 3, "fingerprint": "a:b"})
    assert layout.chunk_of(np.arange(19)).tolist() == frame_chunks(19, 3, True)
    with torch.device("meta"):
        model = WanModel(preset("wan2.1-t2v-1.3b", num_layers=1), causal=True, independent_first_frame=True)
    probe, calls = record_calls(model, 0)
    s = FlowMatchScheduler(5.0)
    with attach(model, probe):
        causal_few_step(model, torch.empty(1, 19, 16, 60, 104, device="meta"),
                        torch.empty(1, 512, 4096, device="meta"), timesteps=s.warp([1000, 750, 500, 250]), scheduler=s)
    logit = np.full((1, 1, 12, 19, 19), np.nan, dtype=np.float32)  # [step, layer, head, query_frame, key_frame]
    cells = logit[0, 0]  # [head, query_frame, key_frame]
    for call in (c for c in calls if c.labels.step == 0):
        for qf in call.query_frames:
            cells[:, qf, list(call.key_frames)] = 1 + np.arange(12)[:, None] + qf / 100
    mass = np.where(np.isnan(logit), np.nan, 1.0 / np.maximum(1, np.arange(19)[None, :] + 1)).astype(np.float32)
    meta = dict(prompt_index=0, seed=42, prompt="eagle", checkpoint="meta", checkpoint_sha256="0" * 64,
                model_family="self_forcing", sampler="causal_few_step", local_attn_size=-1, sink_size=0,
                tokens=[""] * 512, num_tokens=1)
    StoreWriter(tmp_path / "l3.zarr", "a:b", mode="overwrite").write(
        sample_dataset(layout, meta, {"attn_logit": logit, "attn_mass": mass}))
    ds = open_store(tmp_path / "l3.zarr")
    assert ds.query_chunk.values.tolist() == frame_chunks(19, 3, True)
    (path,) = export_legacy(tmp_path / "l3.zarr", tmp_path / "legacy", log=quiet)
    data = torch.load(path, weights_only=True)
    assert data["block_sizes"] == LAYOUT_19
    assert data["full_frame_attention"].shape == (12, 19, 19) and data["last_block_frame_attention"].shape == (12, 19)
    assert data["last_block_query_frames"] == [16, 17, 18] and data["num_frames"] == 19
    assert (data["frame_seq_length"], data["num_heads"], data["num_frame_per_block"]) == (1560, 12, 3)
    assert torch.equal(data["full_frame_attention"], torch.from_numpy(np.nan_to_num(logit[0, 0])).half())
    full = data["full_frame_attention"].float()
    assert (full[:, 0, 1:] == 0).all() and (full[:, 1:4, 4:] == 0).all() and (full[:, 3, :4] != 0).all()


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory):
    """The embedded model, 19 frames with an independent first frame, layer 2's q, k recorded by module path."""
    out = tmp_path_factory.mktemp("iff") / "iff.zarr"
    with recording_extract([2]) as recorders:
        run_extract(ExtractConfig(layers=[2], num_frames=19, independent_first_frame=True, out=str(out),
                                  progress=False), log=quiet)
    return out, recorders[0].records[2]


def test_export_legacy_real_values_on_the_embedded_model(embedded_store, tmp_path):
    out, calls = embedded_store
    ds = open_store(out)
    assert ds.query_chunk.values.tolist() == frame_chunks(19, 3, True) and ds.attrs["independent_first_frame"] is True
    assert len(calls) == 7 * 5
    (path,) = export_legacy(out, tmp_path, log=quiet)
    data = torch.load(path, weights_only=True)
    assert data["block_sizes"] == LAYOUT_19 and data["full_frame_attention"].shape == (4, 19, 19)
    assert data["last_block_query_frames"] == [16, 17, 18]
    fork = fork_full_frame_attention(calls, LAYOUT_19, 48)  # the fork's algorithm on the token-level logits
    full = data["full_frame_attention"].float()
    torch.testing.assert_close(full, fork, rtol=1e-3, atol=2e-3)
    staircase = torch.tensor(frame_chunks(19, 3, True))
    above = staircase[None, :] > staircase[:, None]
    assert (full[:, above] == 0).all() and (full[:, ~above] != 0).all()
    # studies read the layout from the store: the attended pattern is the staircase of these chunks
    from studies import metrics

    assert metrics.nan_pattern_mismatches(ds) == 0 and metrics.row_sum_error(ds) < 1e-4
    assert metrics.query_frames_for(ds, "last_chunk") == [16, 17, 18] and metrics.num_chunks(ds) == 7


def test_cli_frames_default_and_errors(tmp_path, capsys):
    assert cli_main(["extract", "--layer", "0", "--frames", "21", "--independent-first-frame", "--no-progress",
                     "--out", str(tmp_path / "x.zarr")]) == 2
    assert "1 + 3k frames, e.g. 19 or 22" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
    assert cli_main(["generate", "--frames", "20", "--independent-first-frame", "--out", str(tmp_path / "g")]) == 2
    assert "1 + 3k frames, e.g. 19 or 22" in capsys.readouterr().err
    assert cli_main(["generate", "--independent-first-frame", "--sampler", "bidirectional",
                     "--out", str(tmp_path / "g")]) == 2
    assert "causal samplers" in capsys.readouterr().err


def test_synthetic_store_and_report_read_the_layout(tmp_path):
    from studies import metrics
    from studies.synthetic import make_dataset

    ds = make_dataset("causal", num_frames=19, independent_first_frame=True)
    assert ds.query_chunk.values.tolist() == frame_chunks(19, 3, True)
    assert metrics.nan_pattern_mismatches(ds) == 0
    assert metrics.query_frames_for(ds, "history") == list(range(1, 19))
    window = make_dataset("window", num_frames=19, independent_first_frame=True, local_attn_size=7, sink_size=1)
    assert metrics.nan_pattern_mismatches(window) == 0
    # frame 18 (chunk 6 = frames 16-18): sink frame 0 and the 6 most recent frames 13-18
    attended = np.flatnonzero(~np.isnan(window.attn_mass.isel(sample=0, step=0, layer=0, head=0, query_frame=18)))
    assert attended.tolist() == [0, 13, 14, 15, 16, 17, 18]


# ------------------------------------------------------------------------------------------------------
# training (ODE, DMD, SiD)


def iff_trainer(tmp_path, *overrides, data=None):
    from test_training import tiny_models
    from training import distributed as fsdp
    from training.checks import check_config, load_train_config
    from training.data import PromptSource
    from training.text import HashTextEncoder
    from training.trainer import Trainer
    from test_training import BASE, PROMPTS

    cfg, sets_sid_alpha = load_train_config("configs/self_forcing_dmd.yaml", BASE + [
        "image_or_video_shape=[1,7,16,4,6]", "num_training_frames=7", "independent_first_frame=true", *overrides])
    plan = check_config(cfg, 1, sets_sid_alpha=sets_sid_alpha)
    models = tiny_models(plan.trainer)
    models.generator.independent_first_frame = True
    return Trainer(cfg, models, HashTextEncoder(16, 32), tmp_path, d=fsdp.setup("cpu"), plan=plan,
                   data=data or PromptSource(PROMPTS, 7), progress=False, log=quiet)


@pytest.mark.parametrize("loss", ["dmd", "sid"])
def test_score_distillation_step_with_an_independent_first_frame(tmp_path, loss, one_thread):
    tr = iff_trainer(tmp_path, f"distribution_loss={loss}", "dfake_gen_update_ratio=1")
    probe, calls = record_calls(tr.generator, 0)
    before = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    with attach(tr.generator, probe):
        logs = tr.iteration()
    assert logs["generator_grad_norm"] > 0 and np.isfinite(logs["generator_loss"])
    assert any(not torch.equal(before[k], v) for k, v in tr.generator.state_dict().items())
    # both rollouts (generator, critic) ran the chunks [1, 3, 3]: queries of frame 0 alone see frame 0 alone
    firsts = [(c.query_frames, c.key_frames) for c in calls if c.labels.step == 0 and c.labels.phase != "context"]
    assert ((0,), (0,)) in firsts and ((1, 2, 3), (0, 1, 2, 3)) in firsts and ((4, 5, 6), tuple(range(7))) in firsts
    assert {len(q) for q, _ in firsts} == {1, 3}
    assert len(tr.exit_indices("x")) == 3  # one exit draw per chunk


def test_ode_regression_draws_a_timestep_for_frame_0_alone(tmp_path, one_thread):
    from training import rng
    from training.data import LatentDataset
    from training.losses import chunk_index, ode_regression_loss

    gens = [rng.generator(1, 0, "t", i) for i in range(64)]
    index = chunk_index(gens, [1, 3, 3], 4, device="cpu")  # [64, 7]
    assert (index[:, 1:4] == index[:, 1:2]).all() and (index[:, 4:] == index[:, 4:5]).all()
    assert (index[:, 0] != index[:, 1]).any()  # frame 0 has a draw of its own
    pairs = torch.randn(4, 5, 7, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    data = LatentDataset(["a", "b", "c", "d"], pairs, "ode_pairs", seed=7)
    tr = iff_trainer(tmp_path, "trainer=ode", "total_batch_size=2", data=data)
    masks = []
    probe = Probe(CallFilter(layers={0}, kinds={"self"}), fn=lambda call, *rest: masks.append(call.frame_mask))
    with attach(tr.generator, probe):
        logs = tr.iteration()
    assert np.isfinite(logs["generator_loss"])
    chunk = torch.tensor([0, 1, 1, 1, 2, 2, 2])
    assert masks and all(torch.equal(m, chunk[None, :] <= chunk[:, None]) for m in masks)  # the layout's mask
    with torch.no_grad():
        ode_regression_loss(tr.generator, pairs[:1], torch.randn(1, 16, 32), timesteps=tr.timesteps,
                            scheduler=tr.scheduler, gens=gens[:1])


def test_training_config_errors_name_the_layout():
    from test_training import BASE
    from training.checks import check_config, load_train_config
    from training.errors import TrainingError

    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", BASE + ["independent_first_frame=true"])
    with pytest.raises(TrainingError, match=r"6 latent frames do not fit independent_first_frame.*e.g. 4 or 7"):
        check_config(cfg, 1)


def test_the_image_enters_the_cache_at_t0_whatever_context_noise(one_thread):
    """The researchers' pipeline pushes the image (image-to-video) into the KV cache at t = 0 whatever
    context_noise (pipeline/causal_inference.py); ours ran it at context_noise. So the chunk after the image comes
    out the same with context_noise 0 and 100 (its cache holds the image alone), the next one not."""
    model = tiny_model()
    model.independent_first_frame = True
    g = torch.Generator().manual_seed(0)
    noise, ctx, image = torch.randn(1, 7, C, H, W, generator=g), torch.randn(1, 16, 32), torch.randn(1, 1, C, H, W)
    seen = []
    forward = model.forward

    def spy(x, t, *args, **kw):
        seen.append((kw["labels"].chunk, kw["labels"].phase, float(t.flatten()[0]), kw["labels"].timestep))
        return forward(x, t, *args, **kw)

    model.forward = spy
    runs = {cn: sample(model, "causal_few_step", noise, ctx, generator=torch.Generator().manual_seed(1),
                       initial_latent=image, context_noise=cn) for cn in (0.0, 100.0)}
    assert seen[len(seen) // 2] == (0, "context", 0.0, 0.0)  # the second run's image pass: at 0, labelled 0
    assert (1, "context", 100.0, 100.0) in seen[len(seen) // 2:]
    assert torch.equal(runs[0.0][:, :4], runs[100.0][:, :4]) and not torch.equal(runs[0.0][:, 4:], runs[100.0][:, 4:])


def test_context_noise_where_it_would_not_run_as_given_is_refused(tmp_path):
    """The multi-step CFG sampler's context passes run at t = 0 (their causal_diffusion_inference.py never reads
    context_noise; ours ran them at it), and an image's pass at 0 beside other chunks' context_noise would put two
    timesteps in one of a store's steps: both refused before any work, naming the setting."""
    model = tiny_model()
    x, ctx = torch.randn(1, 3, C, H, W), torch.randn(1, 16, 32)
    with pytest.raises(ModelInputError, match="context_noise 100 sets the few-step sampler's context passes"):
        sample(model, "causal_multi_step_cfg", x, ctx, ctx, num_inference_steps=2, context_noise=100.0)
    out = tmp_path / "s.zarr"
    with pytest.raises(Exception, match="multi-step CFG sampler's run at t = 0"):
        plan(ExtractConfig(sampler="causal_multi_step_cfg", context_noise=100.0, num_frames=3, out=str(out)))
    assert cli_main(["generate", "--sampler", "causal_multi_step_cfg", "--context-noise", "100", "--frames", "3",
                     "--out", str(tmp_path / "g"), "--no-progress"]) == 2
    image = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(image)
    with pytest.raises(Exception, match="an image with context_noise 100: the image's context pass runs at t = 0"):
        plan(ExtractConfig(image=str(image), independent_first_frame=True, context_noise=100.0, num_frames=4,
                           out=str(out)))
    assert not out.exists() and not (tmp_path / "g").exists()

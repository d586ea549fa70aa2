"""models/wan/accel.py: FP8 linear layers against their float64 emulation and the float layer, the FP8 model's
rollout, torch.compile'd blocks (CPU: dynamo with the eager backend; GPU: inductor with CUDA-graph replay)."""

import pytest
import torch

from conftest import tiny_model
from models.common.rollout import causal_few_step
from models.common.scheduler import FlowMatchScheduler
from models.errors import ModelInputError
from models.wan.accel import (Fp8Linear, compile_blocks, fp8_linear_reference, graph_variants, quantize_e4m3,
                              quantize_fp8)

C, H, W = 16, 4, 6


def rollout(model, seed=0, device="cpu", dtype=torch.float32, frames=9, **kw):
    s = FlowMatchScheduler(5.0)
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(1, frames, C, H, W, generator=g, device=device).to(dtype)
    ctx = torch.randn(1, 16, 32, generator=g, device=device).to(dtype)
    return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g, **kw)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_e4m3_quantization():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 8)[:, None]
    q, scale = quantize_e4m3(x, "rowwise")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), 448.0))  # each row's amax maps to 448
    back = q.double() * scale.double()
    assert ((back - x.double()).abs() <= x.double().abs() * 2**-4 + 1e-12 * scale.double()).all()  # 3 mantissa bits
    q, scale = quantize_e4m3(x, "tensor")
    assert scale.shape == () and q.float().abs().max() == 448.0


@pytest.mark.parametrize("cpu_rowwise_scales", [True, False])
@pytest.mark.parametrize("granularity", ["rowwise", "tensor"])
def test_fp8_linear_equals_its_float64_emulation(granularity, cpu_rowwise_scales, monkeypatch):
    """Also on a torch whose CPU `_scaled_mm` takes per-tensor scales only (2.11: the scales applied after)."""
    import models.wan.accel as accel

    if cpu_rowwise_scales and not accel.cpu_rowwise_scales():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only")
    monkeypatch.setattr(accel, "CPU_ROWWISE_SCALES", cpu_rowwise_scales)
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05, generator=g)
        linear.bias.normal_(0, 0.1, generator=g)
    layer = Fp8Linear(linear, granularity)
    x = torch.randn(2, 10, 64, generator=g)
    y = layer(x)
    assert y.shape == (2, 10, 48) and y.dtype == torch.float32
    assert rel(y, fp8_linear_reference(layer, x)) < 1e-6  # torch._scaled_mm == the written-out computation
    exact = linear(x).detach()
    assert 1e-3 < rel(y, exact) < 0.05  # it does quantize, within e4m3's ~2^-4 per element


def test_fp8_model_rollout(one_thread):
    model = tiny_model()
    plain = rollout(model)
    assert quantize_fp8(model, "rowwise") == 2 * (4 + 4 + 2)  # per block: self q k v o, cross q k v o, FFN 2
    assert isinstance(model.blocks[0].ffn[0], Fp8Linear) and isinstance(model.blocks[1].cross_attn.k, Fp8Linear)
    assert type(model.head.head) is torch.nn.Linear  # embeddings and head stay
    fp8 = rollout(model)
    assert torch.isfinite(fp8).all() and 0 < rel(fp8, plain) < 0.3
    assert torch.equal(fp8, rollout(model))  # deterministic
    with pytest.raises(ModelInputError, match="granularity"):
        quantize_fp8(tiny_model(), "channel")


def test_compiled_blocks_give_the_eager_rollout_without_recompiling(one_thread):
    """Dynamo on every block (the eager backend: graph capture and guards without code generation, quick on a
    CPU): the same latents bitwise, the KV cache and attention left eager, and a second rollout reuses the graphs."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    model = tiny_model(local_attn_size=6, sink_size=1)
    plain = rollout(model)
    compile_blocks(model, backend="eager")
    assert torch.equal(rollout(model), plain)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    breaks = " ".join(counters["graph_break"])
    assert "SelfAttention.attention" in breaks and "CrossAttention.attention" in breaks
    assert torch.equal(rollout(model, seed=0), plain)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    dynamo.reset()


@pytest.mark.parametrize("independent_first_frame", [False, True])
def test_compiled_graphs_do_not_grow_with_the_layers(one_thread, independent_first_frame):
    """Every layer runs the same block code on the same shapes, so a model with twice the layers compiles the same
    graphs (the layer index, read by traced code, once gave every layer its own: 30 layers passed dynamo's
    recompile limit and the rest ran eagerly), and a rollout stays within `graph_variants` graphs per piece of
    code (dynamo made to fail past it). Dynamo's eager backend: the compiled rollout equals the plain one bitwise."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    frames = 7 if independent_first_frame else 9  # chunks [1, 3, 3] or [3, 3, 3]
    graphs = {}
    for layers in (2, 4):
        dynamo.reset()
        counters.clear()
        model = tiny_model(num_layers=layers, local_attn_size=6, sink_size=1)
        model.independent_first_frame = independent_first_frame
        plain = rollout(model, frames=frames)
        compile_blocks(model, backend="eager")
        with dynamo.config.patch(recompile_limit=graph_variants(model), fail_on_recompile_limit_hit=True):
            assert torch.equal(rollout(model, frames=frames), plain)
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graph_variants(model) == (6 if independent_first_frame else 4)
    assert graphs[2] == graphs[4] > 0
    dynamo.reset()


def test_compile_modes_that_bring_their_own_cuda_graphs_are_refused():
    with pytest.raises(ModelInputError, match="max-autotune-no-cudagraphs"):
        compile_blocks(tiny_model(), "reduce-overhead")


def test_generate_fp8_flag(tmp_path):
    from safetensors.torch import load_file

    from workbench.cli import main

    base = ["generate", "--prompt", "a red kite", "--frames", "3", "--seed", "1", "--no-video", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--fp8", "--out", str(tmp_path / "b")]) == 0
    a, b = (load_file(str(tmp_path / d / "p0000-s1.safetensors"))["latents"] for d in "ab")
    assert 0 < rel(b, a) < 0.3
    assert main(base + ["--compile", "reduce-overhead", "--out", str(tmp_path / "c")]) == 2  # not an allowed mode


@pytest.mark.gpu
def test_gpu_compiled_and_fp8_rollouts_with_cuda_graphs():
    """Inductor-compiled blocks inside the rollout's CUDA graphs: graphed == eager bitwise (both compiled), and
    close to the uncompiled rollout; FP8 on CUDA equals its float64 emulation to bf16 output rounding."""
    model = tiny_model().cuda().to(torch.bfloat16)
    plain = rollout(model, device="cuda", dtype=torch.bfloat16, cuda_graphs=False)
    compile_blocks(model)
    eager = rollout(model, device="cuda", dtype=torch.bfloat16, cuda_graphs=False)
    for _ in range(3):  # warm-up, record, replay
        graphed = rollout(model, device="cuda", dtype=torch.bfloat16, cuda_graphs=True)
    assert torch.equal(graphed, eager)
    assert rel(eager, plain) < 0.05
    linear = torch.nn.Linear(64, 48).cuda().to(torch.bfloat16)
    layer = Fp8Linear(linear, "rowwise")
    x = torch.randn(100, 64, device="cuda", dtype=torch.bfloat16)
    assert rel(layer(x), fp8_linear_reference(layer, x)) < 1e-2

"""Optional inference accelerations of the DiT: torch.compile of its blocks, and FP8 linear layers.

Both are off by default (`workbench generate --compile`, `--fp8`); bench/bench_compile_fp8.py measures their
speed and how far they move the latents (bench/RESULTS.md).

torch.compile (`compile_blocks`): every transformer block is compiled (inductor, `dynamic=False`). The attention
of each block (`SelfAttention.attention`: the KV-cache bookkeeping `through_cache`, the labelled `AttentionCall`,
the `Attend` module; `CrossAttention.attention`) stays eager (`torch.compiler.disable`): it is Python (which frames
a slot holds, the call's labels, observers, the kernel choice) and calls cuDNN / Triton attention kernels that
compilation would not improve. So a block compiles into a few graphs around it (q, k, v projections and norms;
output projection, residuals, FFN), one per variant of the input: the rollout's first forward (it computes the
text keys/values) or a later one, the chunk's frame count, block 0's input strides or the later blocks'
(`graph_variants` counts them: 4 for chunks of one size, 6 with an independent first frame). The layer index
is read only inside the eager attention, so all layers share those graphs, however many there are, and a
rollout's later chunks and later rollouts reuse them (no recompiles). The rollout's own CUDA graphs
(`models.common.rollout.RolloutGraphs`) still work: the first rollout of a shape runs the compiled blocks eagerly
(compiling every variant), the second records them into CUDA graphs, later ones replay. Modes that use
torch.compile's own CUDA graphs ("reduce-overhead", "max-autotune") are refused: two graph systems would fight
over the same cache buffers; "max-autotune-no-cudagraphs" (the researchers' demo mode) is allowed.

FP8 (`quantize_fp8`): the linear layers of every block (self- and cross-attention q, k, v, o, the FFN) become
`Fp8Linear`: the weight stored once as float8_e4m3fn with a float32 scale per output channel ("rowwise") or
one per tensor ("tensor"), the activation quantized on the fly the same way (per token row, or per tensor),
and the product by `torch._scaled_mm` (FP8 tensor cores on H100/H200; CPU kernels in recent torch), with the
scales applied to the float32 accumulator, output in the model's dtype, bias added after. The embeddings and
the head stay in the model's dtype. `fp8_linear_reference` is the same computation written out in float64
(dequantize, matmul), which the tests compare with.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.errors import ModelInputError
from models.wan import model as wan_model

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
FP8_GRANULARITIES = ("rowwise", "tensor")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
# torch 2.11's CPU `_scaled_mm` takes one scale per tensor only (row-wise scales came in 2.12): there the row-wise
# product runs with unit scales into float32 and the scales are applied after (the same float32 accumulator)
CPU_ROWWISE_SCALES: bool | None = None  # whether this torch's CPU `_scaled_mm` takes row-wise scales (tried once)


def cpu_rowwise_scales() -> bool:
    """Whether the CPU `_scaled_mm` takes row-wise scales, tried once on a 16 x 16 product."""
    global CPU_ROWWISE_SCALES
    if CPU_ROWWISE_SCALES is None:
        a = torch.ones(16, 16).to(E4M3)
        try:
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
            CPU_ROWWISE_SCALES = True
        except RuntimeError:
            CPU_ROWWISE_SCALES = False
    return CPU_ROWWISE_SCALES


# ------------------------------------------------------------------------------------------------------
# torch.compile


def leave_eager() -> None:
    """Mark the attention of every block (`SelfAttention.attention`: KV-cache bookkeeping, the labelled call,
    `Attend`; `CrossAttention.attention`) as not to be compiled, once. (Done here rather than by decorators: those
    would import torch._dynamo, and with it triton, whenever the models are imported.)"""
    from models.wan import model as wan

    for cls in (wan.SelfAttention, wan.CrossAttention):
        if not getattr(cls.attention, "_left_eager", False):
            cls.attention = torch.compiler.disable(cls.attention)
            cls.attention._left_eager = True


def graph_variants(model) -> int:
    """How many graphs dynamo makes of each piece of a block's code (between the eager attention calls) in
    rollouts of one latent size, at most: the first forward, which computes the text keys/values (`text` given),
    then every chunk frame count (`num_frame_per_block`, and 1 with an independent first frame) without; each for
    block 0, whose input comes straight from the patch embedding (other strides), and for the later blocks. Not
    more for more layers: the layer index is read only in the eager attention."""
    chunk_frames = {model.num_frame_per_block, 1 if model.independent_first_frame else model.num_frame_per_block}
    return 2 * (1 + len(chunk_frames))


def compile_blocks(model, mode: str = "default", backend: str = "inductor") -> None:
    """Compile every transformer block of `model` in place (see the module docstring)."""
    if mode not in COMPILE_MODES:
        raise ModelInputError(f"compile mode {mode!r}: use one of {list(COMPILE_MODES)} (modes with torch.compile's "
                              "own CUDA graphs would fight the rollout's CUDA graphs over the KV cache)")
    import torch._dynamo as dynamo

    from models.common.triton_version import usable

    usable()  # (the kernels' version check settled, and said, before the blocks are traced)
    leave_eager()
    # dynamo keeps one graph per variant of each piece of block code, up to recompile_limit (default 8), beyond which
    # the blocks would silently run eagerly
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, graph_variants(model))
    for block in model.blocks:
        block.compile(backend=backend, dynamic=False, **({} if backend != "inductor" else {"mode": mode}))


# ------------------------------------------------------------------------------------------------------
# FP8


def quantize_e4m3(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8, scale) with x ~= x_fp8 * scale: x [M, K] -> float8_e4m3fn [M, K] and a float32 scale [M, 1]
    ("rowwise": amax of each row maps to 448) or [] ("tensor")."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if granularity == "rowwise" else xf.abs().amax()
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(nn.Module):
    """y = x W^T + b with W and x in float8_e4m3fn (module docstring). Made from an `nn.Linear`."""

    def __init__(self, linear: nn.Linear, granularity: str = "rowwise"):
        super().__init__()
        if granularity not in FP8_GRANULARITIES:
            raise ModelInputError(f"FP8 granularity {granularity!r}: use one of {list(FP8_GRANULARITIES)}")
        self.granularity = granularity
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        w8, w_scale = quantize_e4m3(linear.weight.detach(), granularity)  # [N, K], [N, 1] or []
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", w_scale.t().contiguous() if granularity == "rowwise" else w_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        # x [..., K] -> [..., N]
        lead = x.shape[:-1]
        x8, x_scale = quantize_e4m3(x.reshape(-1, self.in_features), self.granularity)  # [M, K], [M, 1] or []
        if self.granularity == "rowwise" and not x8.is_cuda and not cpu_rowwise_scales():
            one = torch.ones((), dtype=torch.float32, device=x8.device)
            y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            y = (y * x_scale * self.weight_scale).to(self.out_dtype)  # [M, N] * [M, 1] * [1, N]
        else:
            y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=self.out_dtype)  # [M, N]; weight_fp8.t() is column-major, as cuBLASLt wants
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, float8_e4m3fn, {self.granularity} scales"


wan_model.OWN_FORWARDS[Fp8Linear] = Fp8Linear.forward  # (a block of them may stop a context pass early)


def fp8_linear_reference(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """What `Fp8Linear.forward` computes, in float64: the quantized activation and weight dequantized, multiplied,
    scaled, plus the bias. x [..., K] -> float64 [..., N]."""
    x8, x_scale = quantize_e4m3(x.reshape(-1, layer.in_features), layer.granularity)
    w_scale = layer.weight_scale.t() if layer.granularity == "rowwise" else layer.weight_scale  # [N, 1] or []
    xd = x8.double() * x_scale.double()
    wd = layer.weight_fp8.double() * w_scale.double()
    y = xd @ wd.t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.view(*x.shape[:-1], layer.out_features)


def quantize_fp8(model, granularity: str = "rowwise") -> int:
    """Replace every block's linear layers by `Fp8Linear` in place; returns how many were replaced. Layers whose
    sizes are not multiples of 16 (what FP8 GEMMs need) stay as they are."""
    if granularity not in FP8_GRANULARITIES:
        raise ModelInputError(f"FP8 granularity {granularity!r}: use one of {list(FP8_GRANULARITIES)}")
    count = 0
    for block in model.blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                    setattr(parent, name, Fp8Linear(child, granularity))
                    count += 1
    return count

"""Helpers that keep the nnsight recipe (docs/nnsight.md) short: read the model's attention through nnsight and
get exactly the numbers `workbench extract` stores.

Where nnsight looks: every attention call of the model goes through an `Attend` module
(`blocks[i].self_attn.attend`, `blocks[i].cross_attn.attend`) whose inputs are (q, k, v, call, observers):
q [B, Lq, H, D] and k, v [B, Lk, H, D] as the kernel sees them (after RMSNorm and RoPE, keys = the KV-cache
window with sink and eviction applied), and `call`, the `AttentionCall` with the layer, step, chunk and the
absolute frames of the queries and keys. So `blocks[3].self_attn.attend.inputs[0]` inside a trace is all a
researcher needs.

    import_nnsight()        nnsight with PYMOUNT off (workbench/nnsight.yaml), unless NNSIGHT_CONFIG is set
    extract_rollout(cfg)    the model `extract` would load, a driver `drive(seed)` for `trace(seed, fn=drive)`,
                            and the number of forwards (= visits of each Attend module) per rollout
    frame_stats(...)        attn_mass and attn_logit of one call, computed as the store's "exact" mode does
    FrameMatrices           collects calls into [step, head, query_frame, key_frame] arrays by their labels
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from models.common.attention import AttentionCall
from models.common.attention_kernels import attention_with_lse
from workbench import reductions
from workbench.errors import WorkbenchError

NNSIGHT_CONFIG = Path(__file__).resolve().with_name("nnsight.yaml")


def import_nnsight():
    """Import nnsight with the workbench's config (PYMOUNT off) unless NNSIGHT_CONFIG already names one.
    The config is read once, at nnsight's first import, so call this before anything imports nnsight."""
    if "nnsight" not in sys.modules:
        os.environ.setdefault("NNSIGHT_CONFIG", str(NNSIGHT_CONFIG))
    import nnsight

    return nnsight


def extract_rollout(cfg, *, prompt_index: int = 0, device=None, dtype=None):
    """(model, drive, forwards) for an `ExtractConfig`: the model `workbench extract` loads for it, a function
    `drive(seed)` that runs the rollout extract runs for (cfg.prompts[prompt_index], seed) and returns the
    clean latents, and the number of DiT forwards of that rollout (35 for 21 frames in the few-step sampler):
    each `Attend` module is visited once per forward, which is the count `tracer.iter[:forwards]` needs."""
    from models.wan.text_encoder import TextEncoder, prompt_cache_dir
    from workbench.extract import _dtype, block_sizes_of, check_device, image_latent, load_model, plan, sample_rollout

    p = plan(cfg)
    cfg = p.cfg  # (its lists as plan reads them: a prompt alone is a list of one)
    if not 0 <= prompt_index < len(cfg.prompts):
        raise WorkbenchError(f"prompt_index {prompt_index}: the config has prompts 0-{len(cfg.prompts) - 1}")
    device = torch.device(check_device(str(device or cfg.device)))
    dtype = _dtype(dtype) if isinstance(dtype, str) else dtype or _dtype(cfg.dtype)
    model = load_model(p, device, dtype)
    encoder = TextEncoder.from_wan_dir(p.wan_dir, device=device, cache_dir=prompt_cache_dir())
    emb = encoder.encode([cfg.prompts[prompt_index]])
    negative = encoder.encode([cfg.negative_prompt]) if cfg.sampler != "causal_few_step" else None
    chunks = len(block_sizes_of(cfg)) if cfg.sampler != "bidirectional" else 1
    forwards = len(p.schedule) * chunks
    initial = image_latent(p, device, dtype)  # image-to-video (cfg.image): frame 0, as extract runs it; else None
    if initial is not None:  # chunk 0, the image, runs its context pass(es) only
        forwards -= sum(1 for s in p.schedule if s.phase != "context")

    def drive(seed: int):
        return sample_rollout(model, p, emb, negative, seed, device, dtype, initial_latent=initial)

    return model, drive, forwards


@torch.no_grad()
def frame_stats(call: AttentionCall, q, k, v, heads=None) -> dict[str, torch.Tensor]:
    """attn_mass and attn_logit of one self-attention call, {name: [B, h, nqf, nkf] float32}, NaN where a
    frame mask leaves a pair out (docs/store.md). Computed as the store's "exact" mode computes them: the row
    log-sum-exp from the model's own attention kernel, then `workbench.reductions`; `heads` selects heads
    after the log-sum-exp, as the probe does."""
    if call.kind != "self":
        raise WorkbenchError(f"frame_stats takes self-attention calls; got a {call.kind} call of layer {call.layer}")
    fsl, mask = call.frame_seq_len, call.frame_mask
    _, lse = attention_with_lse(q, k, v, frame_mask=mask, frame_seq_len=fsl)  # lse [B, H, Lq]
    if heads is not None:
        idx = torch.tensor(list(heads), device=q.device)
        q, k, lse = q.index_select(2, idx), k.index_select(2, idx), lse.index_select(1, idx)
    out = {"attn_mass": reductions.frame_mass(q, k, lse, fsl, mask), "attn_logit": reductions.mean_logit(q, k, fsl)}
    if mask is not None:
        out = {name: x.masked_fill(~mask.to(x.device), float("nan")) for name, x in out.items()}
    return out


class FrameMatrices:
    """attn_mass and attn_logit of one layer as [step, head, query_frame, key_frame] float32 arrays (NaN where
    not attended), filled call by call from the call's own labels: its step, its query frames and key frames."""

    def __init__(self, num_frames: int, num_steps: int, heads=None):
        self.num_frames, self.num_steps = num_frames, num_steps
        self.heads = None if heads is None else list(heads)  # None: every head of the model
        self.values: dict[str, np.ndarray] = {}
        self.layer: int | None = None

    def add(self, call: AttentionCall, q, k, v) -> None:
        """Reduce one call (batch 1) and place it; call this inside the trace, so only small arrays leave it."""
        if self.layer is None:
            self.layer = call.layer
            h = q.shape[2] if self.heads is None else len(self.heads)
            shape = (self.num_steps, h, self.num_frames, self.num_frames)
            self.values = {name: np.full(shape, np.nan, dtype=np.float32) for name in ("attn_mass", "attn_logit")}
        if call.layer != self.layer:
            raise WorkbenchError(f"FrameMatrices holds layer {self.layer}; got a call of layer {call.layer}")
        stats = frame_stats(call, q, k, v, self.heads)
        rows = np.array(call.query_frames)[:, None]
        cols = np.array(call.key_frames)[None, :]
        for name, x in stats.items():
            self.values[name][call.labels.step][:, rows, cols] = x[0].float().cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return self.values

"""Test helpers (not a test module): an independent recorder of self-attention inputs and a dense float64
reference of the store's statistics.

Independence is the point. The recorder hooks `blocks[i].self_attn.attend` with a plain PyTorch forward
pre-hook, so the layer comes from the module path and the (chunk, step) of a call from the order of visits,
not from the `AttentionCall` labels that the probe under test reads. Expected key windows come from the
closed-form window rule (`expected_key_frames`; models/common/window.py states the same rule), not from the KV cache.
The statistics are computed densely in float64: softmax(q k^T / sqrt(d)) over exactly the keys of the call, then reduced per frame.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch


class AttendRecorder:
    """Records (layer, visit, q, k, call) of every self-attention call (`kind="cross"`: cross-attention call) of the
    given layers, by module path."""

    def __init__(self, model, layers, kind: str = "self"):
        self.records: dict[int, list] = {layer: [] for layer in layers}
        attends = [getattr(model.blocks[layer], f"{kind}_attn").attend for layer in layers]
        self._handles = [a.register_forward_pre_hook(self._hook(layer)) for a, layer in zip(attends, layers)]

    def _hook(self, layer):
        def hook(module, args):
            q, k, _v, call = args[:4]
            self.records[layer].append((q.detach().clone(), k.detach().clone(), call))
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def recording_extract(layers):
    """Within the block, every model `workbench extract` loads gets an `AttendRecorder` on `layers`; yields the
    list of recorders (one per load)."""
    import workbench.extract as extract_mod

    recorders, load = [], extract_mod.load_wan

    def load_and_record(*args, **kw):
        model = load(*args, **kw)
        recorders.append(AttendRecorder(model, layers))
        return model

    extract_mod.load_wan = load_and_record
    try:
        yield recorders
    finally:
        extract_mod.load_wan = load


def expected_key_frames(chunk: int, nfpb: int, local_attn_size: int = -1, sink_size: int = 0) -> tuple[int, ...]:
    """The frames the KV cache holds when chunk `chunk` attends (the window rule of models/common/window.py, written out
    independently): every frame up to the end of the chunk; with a window, the first `sink_size` frames and the latest `local_attn_size - sink_size`."""
    end = (chunk + 1) * nfpb
    if local_attn_size == -1:
        return tuple(range(end))
    recent = local_attn_size - sink_size
    return tuple(f for f in range(end) if f < sink_size or f >= end - recent)


def dense_frame_stats(q, k, frame_seq_len: int, frame_mask=None):
    """(mass, logit), each [B, H, nqf, nkf] float64, from q [B, Lq, H, D] and k [B, Lk, H, D].

    Dense softmax over every key of the call in float64; `frame_mask` [nqf, nkf] (True = attended) takes key
    frames out of a query frame's softmax, and the masked cells are NaN in both outputs."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    fsl = frame_seq_len
    nqf, nkf = Lq // fsl, Lk // fsl
    q64, k64 = q.double().transpose(1, 2), k.double().transpose(1, 2)  # [B, H, L, D]
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(D)  # [B, H, Lq, Lk]
    logit = s.reshape(B, H, nqf, fsl, nkf, fsl).mean(dim=(3, 5))
    if frame_mask is not None:
        tok = frame_mask.repeat_interleave(fsl, 0).repeat_interleave(fsl, 1)
        s = s.masked_fill(~tok, float("-inf"))
    p = torch.softmax(s, dim=-1)
    mass = p.reshape(B, H, nqf, fsl, nkf, fsl).sum(dim=5).mean(dim=3)
    if frame_mask is not None:
        mass = mass.masked_fill(~frame_mask, float("nan"))
        logit = logit.masked_fill(~frame_mask, float("nan"))
    return mass, logit


def dense_key_token_mass(q, k, frame_seq_len: int, frame_mask=None):
    """attn_key_token [B, H, nqf, Lk] float64: per query frame, the mean over its query tokens of the softmax
    probability of each key token (dense, over the keys of the call); NaN on the tokens of masked key frames."""
    B, Lq, H, D = q.shape
    fsl = frame_seq_len
    nqf, Lk = Lq // fsl, k.shape[1]
    s = q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2) / math.sqrt(D)  # [B, H, Lq, Lk]
    if frame_mask is not None:
        s = s.masked_fill(~frame_mask.repeat_interleave(fsl, 0).repeat_interleave(fsl, 1), float("-inf"))
    p = torch.softmax(s, dim=-1).reshape(B, H, nqf, fsl, Lk).mean(dim=3)
    if frame_mask is not None:
        p = p.masked_fill(~frame_mask.repeat_interleave(fsl, 1), float("nan"))
    return p


def dense_cross_mass(q, k_text, frame_seq_len: int):
    """cross_mass [B, H, nqf, T] float64: per query frame, the mean over its tokens of the softmax over the text
    tokens, from q [B, Lq, H, D] and the text keys [B, T, H, D]."""
    B, Lq, H, D = q.shape
    s = q.double().transpose(1, 2) @ k_text.double().transpose(1, 2).transpose(-1, -2) / math.sqrt(D)  # [B, H, Lq, T]
    return torch.softmax(s, dim=-1).reshape(B, H, Lq // frame_seq_len, frame_seq_len, -1).mean(dim=3)


def nan_equal(a, b) -> bool:
    """Same NaN pattern and the same values elsewhere (bitwise for floats)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(np.isnan(a), np.isnan(b))) and \
        bool(np.array_equal(np.nan_to_num(a, nan=0.0), np.nan_to_num(b, nan=0.0)))


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over the cells where both are numbers (asserting first that the NaN patterns agree)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN patterns differ"
    ok = ~np.isnan(a)
    return float(np.abs(a[ok] - b[ok]).max()) if ok.any() else 0.0


def dense_frame_entropy(q, k, frame_seq_len: int, frame_mask=None):
    """attn_frame_entropy [B, H, nqf] float64 (docs/store.md): per query token, the entropy in nats of its
    softmax probability summed per key frame (0 ln 0 = 0), averaged over the query frame's tokens. Dense
    float64 softmax over every key of the call; `frame_mask` [nqf, nkf] takes key frames out of it."""
    B, Lq, H, D = q.shape
    fsl = frame_seq_len
    nqf, nkf = Lq // fsl, k.shape[1] // fsl
    s = q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2) / math.sqrt(D)  # [B, H, Lq, Lk]
    if frame_mask is not None:
        s = s.masked_fill(~frame_mask.repeat_interleave(fsl, 0).repeat_interleave(fsl, 1), float("-inf"))
    per_frame = torch.softmax(s, dim=-1).reshape(B, H, Lq, nkf, fsl).sum(dim=-1)  # [B, H, Lq, nkf]
    plogp = torch.where(per_frame > 0, per_frame * per_frame.log(), torch.zeros_like(per_frame))
    return (-plogp.sum(dim=-1)).reshape(B, H, nqf, fsl).mean(dim=-1)

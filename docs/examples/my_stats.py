"""An example plugin: a statistic of one's own (docs/architecture.md, "Statistics registry").

    PYTHONPATH=docs/examples WORKBENCH_PLUGINS=my_stats workbench extract --layers 3 \
        --stats attn_mass,attn_key_max --out runs/mine.zarr

`attn_key_max`: how peaked each query token's attention is, the largest softmax probability it gives any one key
token, averaged over the query frame's tokens. Read from q, k and the row log-sum-exp the probe gets (`needs_lse`),
one query frame and one head at a time; the keys of key frames the call did not attend do not count.
"""

import math

import torch

from workbench.statistics import CallTensors, Statistic, register


def key_max(t: CallTensors) -> torch.Tensor:
    """-> [B, heads, query frames] float32: (1/fsl) sum over the frame's query tokens of max_j p_ij."""
    B, Lq, H, D = t.q.shape  # q [B, Lq, heads, head_dim], k [B, Lk, heads, head_dim], lse [B, heads, Lq]
    fsl, scale = t.frame_seq_len, 1.0 / math.sqrt(D)
    nqf = Lq // fsl
    out = torch.zeros(B, H, nqf, dtype=torch.float32, device=t.q.device)
    for qf in range(nqf):
        rows = slice(qf * fsl, (qf + 1) * fsl)
        allowed = None if t.frame_mask is None else t.frame_mask[qf].to(t.q.device).repeat_interleave(fsl)  # [Lk]
        for h in range(H):
            logits = t.q[:, rows, h].float() @ t.k[:, :, h].float().transpose(1, 2) * scale  # [B, fsl, Lk]
            if allowed is not None:
                logits = logits.masked_fill(~allowed, -math.inf)
            p_max = torch.exp(logits.amax(dim=-1) - t.lse[:, h, rows])  # [B, fsl]
            out[:, h, qf] = p_max.mean(dim=-1)
    return out


register(Statistic(
    "attn_key_max", ("sample", "step", "layer", "head", "query_frame"), "self", needs_lse=True, reduce=key_max,
    long_name="largest key-token probability", units="probability",
    description="(1/fsl) sum over the query tokens i of query_frame of max_j p_ij, p_ij the softmax probability of "
                "key token j (keys the call attended only)",
    help="how peaked each query token's attention is"))

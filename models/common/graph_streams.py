"""CUDA streams for recording CUDA graphs and for decoding beside a rollout, one per owner and kept.

Why not PyTorch's defaults: PyTorch keeps cuBLAS's workspace (scratch memory for split-K partial sums and the
semaphores of stream-K GEMM kernels) per (cuBLAS handle, stream), and a GEMM recorded in a CUDA graph uses the
workspace of the stream it was recorded on at every replay. `torch.cuda.graph` records on one capture stream shared
by the whole process unless it is given one, so the rollout's DiT graphs (models/common/rollout.py) and the fast
VAE decoder's graphs (models/wan/vae_fast.py) would share one workspace, and `workbench generate` replays them at
the same time on two streams (each chunk's decode beside the next chunk's denoising): two GEMMs in the same
scratch memory, which can give wrong sums or a kernel that waits forever on a semaphore the other GEMM reset.
(The streamed pipeline hung on H200s with shared recording in session 24; in session 25 neither the pipeline with
the old handling nor bench/bench_graph_streams.py reproduced it, so this is hygiene, not a proven fix:
bench/RESULTS.md.)
Recent PyTorch versions also drop a stream's workspace when a graph recorded on that stream is freed, which would
pull it from under another owner's live graphs (pytorch/pytorch#193402). So each owner records on a stream of
its own, made once and kept for the owner's lifetime (`capture_stream`), and side streams that run eager
GEMMs beside graph replays are kept per owner too (`side_stream`) rather than drawn anew for every video:
`torch.cuda.Stream()` hands out PyTorch's pooled streams in turn (32 per priority), so drawing one per video
would, after enough videos, hand out a stream that some graphs were recorded on.
"""

from __future__ import annotations

import weakref

import torch

# owner -> {(kind, device, priority): stream}; held beside the owner rather than on it, so that copying a model
# (an EMA copy, a checkpoint) never meets a stream
_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stream(owner, kind: str, device, priority: int) -> torch.cuda.Stream:
    streams = _STREAMS.setdefault(owner, {})
    key = (kind, torch.device(device), priority)
    if key not in streams:
        streams[key] = torch.cuda.Stream(device=key[1], priority=priority)
    return streams[key]


def capture_stream(owner, device) -> torch.cuda.Stream:
    """The stream `owner` records its CUDA graphs on (`torch.cuda.graph(..., stream=capture_stream(owner,
    device))`): made on first use and kept as long as the owner lives, so graphs of other owners never share its
    cuBLAS workspace."""
    return _stream(owner, "capture", device, 0)


def side_stream(owner, device, priority: int = 0) -> torch.cuda.Stream:
    """A side stream of `priority` for `owner`'s work beside the caller's stream (the streamed VAE decode), made
    on first use and kept as long as the owner lives."""
    return _stream(owner, "side", device, priority)

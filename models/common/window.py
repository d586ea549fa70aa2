"""The attention window rule, once: which key frames a query frame attends in a chunked causal rollout.

Query frame i attends every key frame up to the end of its chunk (block-causal); the chunks are the layout of
models/common/chunks.py (chunks of n frames, or frame 0 alone first with `independent_first_frame`). With a window of
`local_attn_size` frames and `sink_size` sink frames, it attends what the rolling KV cache (models/common/kv_cache.py)
holds after writing i's chunk: the first `sink_size` frames and the most recent `local_attn_size - sink_size`
frames up to the end of i's chunk. A bidirectional forward is one chunk holding every frame.
`WanModel.block_causal_mask` (the full-sequence forward) and the synthetic stores (studies/synthetic.py) read
this rule; the KV cache implements the same rule by eviction, and tests/attention_reference.py writes it out
independently. Importing this module does not import torch.
"""

from __future__ import annotations

from models.common.chunks import chunk_spans
from models.errors import ModelInputError


def check_window_room(local_attn_size: int, sink_size: int, frames_per_chunk: int,
                      name: str = "local_attn_size") -> None:
    """A window (local_attn_size frames; -1: global) holds the sink and a whole chunk, as the KV cache needs to
    place a chunk beside the sink: ModelInputError naming the least window otherwise (a smaller one would let a
    query frame miss itself, or see frames after its chunk's, in the rule below). `name`: the setting as the caller
    knows it (a flag, a config key)."""
    if local_attn_size != -1 and local_attn_size < sink_size + frames_per_chunk:
        frames = lambda n: f"{n} frame{'' if n == 1 else 's'}"  # noqa: E731
        raise ModelInputError(f"{name} {local_attn_size}: the window must hold the sink ({frames(sink_size)}) and a "
                              f"chunk ({frames(frames_per_chunk)}): at least {sink_size + frames_per_chunk}, or -1 "
                              "(global attention)")


def attended_key_frames(num_frames: int, frames_per_chunk: int, local_attn_size: int = -1, sink_size: int = 0,
                        independent_first_frame: bool = False) -> list[list[bool]]:
    """[query_frame][key_frame] bool: whether the query frame attends the key frame (local_attn_size -1:
    global attention). Frames that do not fit the chunk layout raise ModelInputError (models/common/chunks.py), as
    does a window without room for the sink and a chunk (`check_window_room`)."""
    check_window_room(local_attn_size, sink_size, frames_per_chunk)
    ends = [start + size for start, size in chunk_spans(num_frames, frames_per_chunk, independent_first_frame)
            for _ in range(size)]  # [query_frame] one past the last frame of its chunk
    rows = []
    for end in ends:
        row = [j < end for j in range(num_frames)]
        if local_attn_size != -1:
            row = [a and (j >= end - (local_attn_size - sink_size) or j < sink_size) for j, a in enumerate(row)]
        rows.append(row)
    return rows

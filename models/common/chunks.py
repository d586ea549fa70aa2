"""How a causal model splits latent frames into chunks (generation blocks).

Two layouts, as Self-Forcing's `CausalWanModel` and pipelines have them:
- chunks of `num_frame_per_block` frames from frame 0: 21 frames in chunks of 3 -> [3, 3, 3, 3, 3, 3, 3];
- `independent_first_frame`: frame 0 is a chunk of its own, then chunks of `num_frame_per_block`:
  19 frames -> [1, 3, 3, 3, 3, 3, 3] (the researchers' extraction layout; their pipelines assert
  (F - 1) % num_frame_per_block == 0). Image-to-video puts the image's latent in that first chunk.

The block-causal mask, every rollout, the training losses' per-chunk timesteps and the stores' `query_chunk` /
`key_chunk` all read the layout from here, so a chunk means the same thing everywhere.
"""

from __future__ import annotations

from models.errors import ModelInputError


def block_sizes(num_frames: int, num_frame_per_block: int = 3, independent_first_frame: bool = False) -> list[int]:
    """Frames per chunk, in order; a clear error when the frames do not fit the layout."""
    n = num_frame_per_block
    if n < 1:
        raise ModelInputError(f"num_frame_per_block {n} must be >= 1")
    if num_frames < 1:
        raise ModelInputError(f"{num_frames} latent frames: need at least 1")
    if independent_first_frame:
        if (num_frames - 1) % n:
            k = (num_frames - 1) // n
            raise ModelInputError(
                f"{num_frames} latent frames do not fit independent_first_frame (frame 0 is a chunk of its own, then "
                f"chunks of {n}): use 1 + {n}k frames, e.g. {1 + n * k} or {1 + n * (k + 1)}")
        return [1] + [n] * ((num_frames - 1) // n)
    if num_frames % n:
        raise ModelInputError(
            f"{num_frames} latent frames do not divide into chunks of {n} (num_frame_per_block); use a multiple of "
            f"{n}" + (f", or 1 + {n}k frames with independent_first_frame" if (num_frames - 1) % n == 0 else ""))
    return [n] * (num_frames // n)


def chunk_spans(num_frames: int, num_frame_per_block: int = 3,
                independent_first_frame: bool = False) -> list[tuple[int, int]]:
    """(first frame, frame count) of every chunk: 19 frames, independent first frame -> (0, 1), (1, 3), ..."""
    spans, start = [], 0
    for size in block_sizes(num_frames, num_frame_per_block, independent_first_frame):
        spans.append((start, size))
        start += size
    return spans


def frame_chunks(num_frames: int, num_frame_per_block: int = 3, independent_first_frame: bool = False) -> list[int]:
    """The chunk index of every frame: 7 frames, independent first frame -> [0, 1, 1, 1, 2, 2, 2]."""
    out: list[int] = []
    for c, size in enumerate(block_sizes(num_frames, num_frame_per_block, independent_first_frame)):
        out += [c] * size
    return out

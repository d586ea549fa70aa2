"""3-D rotary position embedding of Wan2.1 (time, height, width), with absolute temporal positions.

Each head's channels are taken as consecutive pairs (2i, 2i+1) and rotated by an angle that depends on the
token's (frame, row, column) position. The pairs are split between the three axes as [22, 21, 21] at
head_dim 128, i.e. channels 0-43 carry time, 44-85 height and 86-127 width (`WanConfig.rope_split`).
The table has 1024 positions per axis; in the causal model the frame position is the absolute latent frame
index, so frame 1024 is the first that cannot be generated.

Angles are computed in float64 (as Wan does); the rotation itself (`models.wan.fused.rope`, fused with the q/k
RMSNorm in `qk_norm_rope`) runs in float32 (float64 for float64 inputs) and casts back.
"""

from __future__ import annotations

import torch

from models.errors import ModelInputError
from models.wan.config import ROPE_MAX_POSITIONS


def axis_angles(channels: int, positions: int = ROPE_MAX_POSITIONS, theta: float = 10000.0) -> torch.Tensor:
    """Angles for one axis: [positions, channels // 2] float64, angle[p, j] = p * theta^(-2j / channels)."""
    inv_freq = theta ** (-torch.arange(0, channels, 2, dtype=torch.float64, device="cpu") / channels)  # [channels/2]
    return torch.outer(torch.arange(positions, dtype=torch.float64, device="cpu"), inv_freq)  # host table, even under a meta-device context


class RopeTable:
    """Per-axis angle tables for one head_dim; `angles(...)` builds the per-token rotation of a forward."""

    def __init__(self, split: tuple[int, int, int], positions: int = ROPE_MAX_POSITIONS):
        self.split = split
        self.positions = positions
        self.tables = [axis_angles(c, positions) for c in split]  # [positions, c/2] each

    def angles(self, frames: int, height: int, width: int, start_frame: int = 0) -> torch.Tensor:
        """Rotation angles of a token grid whose first frame has absolute index `start_frame`.

        Returns [frames * height * width, head_dim / 2] float64, tokens in (frame, row, column) order."""
        if start_frame < 0 or start_frame + frames > self.positions:
            raise ModelInputError(
                f"RoPE positions past {self.positions}: frames {start_frame}..{start_frame + frames - 1} were asked "
                f"for, but the table holds frame positions 0..{self.positions - 1}"
            )
        if height > self.positions or width > self.positions:
            raise ModelInputError(f"token grid {height}x{width} exceeds the {self.positions} RoPE positions")
        t, h, w = self.tables
        t = t[start_frame : start_frame + frames][:, None, None, :].expand(frames, height, width, -1)
        h = h[:height][None, :, None, :].expand(frames, height, width, -1)
        w = w[:width][None, None, :, :].expand(frames, height, width, -1)
        return torch.cat([t, h, w], dim=-1).reshape(frames * height * width, -1)


def rope_cos_sin(angles: torch.Tensor, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles, [L, 1, head_dim/2] each, ready to broadcast over [B, L, heads, head_dim/2]."""
    return angles.cos()[:, None, :].to(device, dtype), angles.sin()[:, None, :].to(device, dtype)

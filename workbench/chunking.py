"""The chunk layout of an `extract` run (its frames per chunk, checked) and, for image-to-video, the latent of its
first frame. `workbench.extract` uses both (and the nnsight recipe the layout), with its config and plan.

    block_sizes_of(cfg)          [3] * 7 for 21 frames; [1, 3, 3, 3, 3, 3, 3] for 19 with independent_first_frame
    image_latent(plan, ...)      the --image file at the video's size, VAE-encoded: [1, 1, 16, h, w] (or None)
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError


def check_image_frames(frames: int, per_chunk: int) -> None:
    """With --image frame 0 is the image: a rollout of it alone generates nothing."""
    if frames <= 1:
        raise WorkbenchError(f"--frames {frames} with --image: frame 0 is the image, so nothing would be generated; "
                             f"give 1 + a multiple of {per_chunk} (e.g. {1 + per_chunk * max(1, 18 // per_chunk)})")


FIRST_FRAME_HINT = ", or --independent-first-frame"  # (a command without that flag leaves it out of the error)


def block_sizes_of(cfg) -> list[int]:
    """Frames per chunk of an `ExtractConfig`'s causal rollout (models/common/chunks.py), or a WorkbenchError naming
    --frames."""
    from models.common.chunks import block_sizes
    from models.errors import ModelInputError

    F, n = cfg.num_frames, cfg.num_frame_per_block
    try:
        return block_sizes(F, n, cfg.independent_first_frame)
    except ModelInputError as err:
        if cfg.independent_first_frame:
            image = " (--image makes frame 0 a chunk of its own)" if getattr(cfg, "image", None) else ""
            raise WorkbenchError(f"--frames {F}: {err}{image}") from None
        near = [m for m in (F // n * n, F // n * n + n) if m > 0]  # (the multiples around F)
        raise WorkbenchError(f"--frames {F} does not divide into chunks of {n}; use a multiple of {n} (e.g. "
                             f"{' or '.join(map(str, near))})"
                             + (FIRST_FRAME_HINT if (F - 1) % n == 0 else "")) from None


def image_latent(p, device, dtype) -> torch.Tensor | None:
    """Image-to-video: an extract `Plan`'s image at the video's size, encoded by the model folder's VAE:
    [1, 1, 16, h, w] (None without --image)."""
    if p.cfg.image is None:
        return None
    from models.family import family_of
    from models.video import read_image
    from models.wan.folder import wan_parts
    from models.wan.vae import WanVAE

    _, h, w = p.geometry
    stride = family_of(p.wan_dir).vae_stride  # pixels per latent cell
    vae = WanVAE.from_file(wan_parts(p.wan_dir).vae, device=device)
    return vae.encode(read_image(p.cfg.image, stride * h, stride * w)[None, :, None]).to(device, dtype)

"""`workbench train --make-ode-pairs`: the teacher's ODE trajectories that ODE regression (`trainer: ode`) learns
from, written as a latent dataset (training/data.py) to the config's `data_path`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training import distributed as fsdp
from training.checks import check_config, model_folder
from training.errors import TrainingError


def build_ode_pairs(cfg, *, log=print, progress: bool = True) -> Path:
    """`--make-ode-pairs`: the teacher (`model_root/real_name`, bidirectional, float32) makes `ode_pairs.num_pairs`
    trajectories for the prompts of `ode_pairs.prompt_file` (cycled), written to `data_path`. Rank 0 works."""
    from models.video import read_prompts
    from models.wan.checkpoint import load_wan
    from models.wan.text_encoder import TextEncoder, prompt_cache_dir
    from training.data import save_latent_dataset
    from training.rollout import make_ode_pairs
    from workbench.progress import progress_bar

    d = fsdp.setup(cfg.device)
    plan = check_config(cfg, 1)
    op = cfg.ode_pairs
    if not op.prompt_file:
        raise TrainingError("ode_pairs.prompt_file is not set (the prompts to make ODE pairs for)")
    try:
        prompts = read_prompts(op.prompt_file)
    except Exception as err:
        raise TrainingError(f"ode_pairs.prompt_file: {err}") from None
    for key in ("num_pairs", "steps", "batch_size"):
        if op[key] < 1:
            raise TrainingError(f"ode_pairs.{key} {op[key]} must be >= 1")
    keep = list(op.keep)
    if any(not 0 <= k < op.steps for k in keep) or keep != sorted(set(keep)):
        raise TrainingError(f"ode_pairs.keep {keep}: give steps in [0, {op.steps}) (ode_pairs.steps {op.steps}), "
                            "increasing, each once (the pairs hold the latents in step order)")
    out = Path(cfg.data_path)
    if out.exists():
        raise TrainingError(f"data_path {str(out)!r} already exists; remove it to make new ODE pairs")
    folder = model_folder(cfg, cfg.real_name)
    if d.main:
        teacher = load_wan(folder, causal=False, dtype=torch.float32, device=d.device)
        encoder = TextEncoder.from_wan_dir(folder, device=d.device, cache_dir=prompt_cache_dir())
        chosen = [prompts[i % len(prompts)] for i in range(op.num_pairs)]
        context = encoder.encode(chosen).context.to(d.device, torch.float32)
        negative = encoder.encode([cfg.negative_prompt]).context.to(d.device, torch.float32)
        batches = -(-op.num_pairs // op.batch_size)
        bar = progress_bar(total=batches * op.steps * 2, desc="ODE pairs", unit="fwd", disable=not progress)
        try:
            latents = make_ode_pairs(teacher, context, negative, shape=plan.shape, steps=op.steps, shift=op.shift,
                                     guidance_scale=op.guidance_scale, keep=tuple(op.keep), seed=op.seed,
                                     batch_size=op.batch_size, on_forward=lambda *_: bar.update(1))
        finally:  # (also when stopped or failed: an open bar is drawn again under later output)
            bar.close()
        save_latent_dataset(out, chosen, latents, "ode_pairs", teacher=str(folder), steps=op.steps, shift=op.shift,
                            guidance_scale=op.guidance_scale, keep=list(op.keep))
        log(f"wrote {out}: {op.num_pairs} ODE pairs of shape {tuple(latents.shape[1:])} "
            f"(latents before steps {list(op.keep)} of {op.steps}, then the clean latent)")
    d.barrier()
    return out

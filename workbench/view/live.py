"""`workbench generate --live`: capture attention during generation and stream every finished chunk to disk.

    generate --live --> live_plan (extract's validation: layers, heads, steps, capture mode)
                    --> LiveRun: extract's StatsProbe attached for each sample; the rollout's on_chunk callback
                        (models/common/rollout.py) -> the chunk's pixel frames (streaming VAE decoder, in generate) and
                        its query frames' rows of attn_mass -> stream.StreamWriter (atomic files) -> workbench view

The probe is the one `workbench extract` uses, so the streamed numbers are those of a store of the same run, and
it never changes the rollout: the latents are bitwise those of generate without --live (tests/test_view.py).
"""

from __future__ import annotations

import atexit
import contextlib
import shlex
import sys

import numpy as np
import torch

from models.video import to_uint8_frames
from models.wan.config import VAE_STRIDE
from models.wan.vae import pixel_frames
from workbench.commands import schedule_settings
from workbench.errors import WorkbenchError
from workbench.extract import ExtractConfig, Plan, make_probe, parse_int_list, plan
from workbench.hooks import attach
from workbench.view.sources import pixel_span
from workbench.view.stream import StreamWriter


def live_plan(args, prompts: list[str], seeds: list[int], device: torch.device, dtype: str, h: int, w: int) -> Plan:
    """The capture plan of a generate run (its argparse namespace), validated before any weights are read."""
    cfg = ExtractConfig(
        layers=parse_int_list(args.layers, what="layer"), heads=parse_int_list(args.heads, what="head"),
        steps=parse_int_list(args.steps, what="step"), stats=["attn_mass"], prompts=prompts, seeds=seeds,
        num_frames=args.frames, independent_first_frame=args.independent_first_frame, image=args.image,
        model=args.model, wan_dir=args.wan_dir, checkpoint=args.checkpoint, use_ema=args.use_ema,
        trust_pickle=args.trust_pickle, sampler=args.sampler, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
        **schedule_settings(args), height=h * VAE_STRIDE, width=w * VAE_STRIDE,
        device=str(device), dtype=dtype, out=str(args.out), attention_kernel=args.attention_kernel)
    return plan(cfg)


class LiveRun:
    """The stream of a run (its manifest is written at once, so a page can wait for the first chunk) and one probe
    for all its samples (reset per sample)."""

    def __init__(self, p: Plan, out, device, fps: int = 16, command: list[str] | None = None):
        self.plan, self.device = p, device
        self.probe = self.model = None
        F = p.geometry[0]
        steps = [s for s in p.schedule if s.step in p.spec.steps]
        self.writer = StreamWriter(out, num_frames=F, pixel_frames=pixel_frames(F), fps=fps, layers=p.spec.layers,
                                   heads=p.spec.heads, steps=steps,
                                   command=shlex.join(command or sys.argv),
                                   image=None if p.cfg.image is None else str(p.cfg.image))
        self.sample_name: str | None = None
        atexit.register(self._abandoned)  # a run that dies before close() leaves a "failed" stream, not "running"

    @contextlib.contextmanager
    def sample(self, model, name: str, *, prompt: str, prompt_index: int, seed: int):
        """Around one sample's rollout: the probe attached to the model, the sample listed in the stream."""
        if self.probe is None or self.model is not model:
            self.probe, self.model = make_probe(model, self.plan, self.device), model
        self.probe.reset()
        self.sample_name = name
        self.writer.begin_sample(name, prompt=prompt, prompt_index=prompt_index, seed=seed)
        try:
            with attach(self.model, self.probe):
                yield self
        except BaseException:
            self.writer.close("failed")  # the page stops waiting for more chunks
            raise
        missing = self.probe.missing_steps(self.plan.geometry[0], from_frame=1 if self.plan.cfg.image else 0)
        if missing:
            raise WorkbenchError(f"the rollout did not produce every captured (kind, step, layer): {missing[:5]}")
        self.writer.end_sample(name)

    def chunk(self, chunk: int, start: int, count: int, video: torch.Tensor | None) -> None:
        """A finished chunk: latent frames start..start+count-1 (the rollout's labels) and their decoded pixel
        frames video [1, 3, t, H, W] in [-1, 1] (None without a VAE)."""
        frames = list(range(start, start + count))
        first, stop = pixel_span(frames[0])[0], pixel_span(frames[-1])[1]
        named = f"latent frame {start}" if count == 1 else f"latent frames {frames[0]}-{frames[-1]}"
        if video is not None and video.shape[2] != stop - first:
            raise WorkbenchError(f"chunk {chunk} ({named}) decoded to {video.shape[2]} "
                                 f"pixel frames; the Wan VAE's frame mapping says {stop - first}")
        mass = self.probe.buffers["attn_mass"][0]  # [step, layer, head, query_frame, key_frame] on the device
        rows = mass[:, :, :, start : start + count].cpu().numpy()
        if video is not None and not bool(torch.isfinite(video).all()):  # (to_uint8_frames: "bad input", exit 2)
            from workbench.errors import Diverged

            raise Diverged.rollout(f"sample {self.sample_name}: the rollout is not finite (NaN or inf) in chunk "
                                   f"{chunk} ({named})",
                                   "the live stream stops before that chunk")
        pixels = None if video is None else to_uint8_frames(video[0])  # [t, H, W, 3]
        self.writer.write_chunk(self.sample_name, chunk, frames, np.ascontiguousarray(rows), pixels, first)

    def close(self) -> None:
        self.writer.close("done")
        atexit.unregister(self._abandoned)

    def _abandoned(self) -> None:
        if self.writer.manifest["status"] == "running":
            self.writer.close("failed")

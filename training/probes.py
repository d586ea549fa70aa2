"""Attention probes during training: a fixed probe set runs through the few-step rollout every N steps, and
its extraction statistics are appended to a store along a `train_step` dim (docs/store.md, "Training probe
stores").

One probe = for each (prompt, seed) of the probe set, the rollout `workbench extract` runs (noise and
re-noising from `torch.Generator().manual_seed(seed)`, the training's denoising steps and context noise) with
`workbench.capture.StatsProbe` attached; the samples are built with `workbench.store.sample_dataset` and the
whole probe is one append along `train_step`. Probes run under no_grad, draw only from their own generators,
and restore the global RNG state (CPU and CUDA), so the training trajectory is bitwise unchanged. Under FSDP
every rank runs the probe rollouts (the forwards are collective) and rank 0 writes.

`ProbeStoreWriter` is `workbench.store.StoreWriter` appending along `train_step`: the train steps written are
listed in the store's attrs (`completed_train_steps`) after their arrays; opening truncates a partial append
and, when training resumes from step s, every probe after s (they will be recomputed, identically).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from training.errors import TrainingError
from workbench.errors import WorkbenchError
from workbench.store import COORD_ATTRS, StoreLayout, StoreWriter, sample_dataset


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Restore the global CPU (and CUDA) RNG state on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


OTHER_STORE = "use a new logdir, or name another probe.store (its probes then start at this run's steps)"


class ProbeStoreWriter(StoreWriter):
    """Appends one probe (all samples of one train step) at a time along `train_step`."""

    def __init__(self, path, fingerprint: str, fields: dict | None = None, mode: str = "resume"):
        try:
            super().__init__(path, fingerprint, append_dim="train_step", completed_attr="completed_train_steps",
                             hint=OTHER_STORE, fields=fields, mode=mode)
        except TrainingError:
            raise
        except WorkbenchError as err:
            raise TrainingError.of(err) from err
        self.completed = [int(s) for s in self.completed]

    def keep_until(self, step: int) -> None:
        """Drop the probes after train step `step` (a resumed run recomputes them)."""
        self.keep_only([s for s in self.completed if s <= step])


def _probe_differences(stored_yaml: str | None, yaml: str | None) -> str:
    """'probe.layers: [0] in the store, [1] in this run' from two runs' config_yaml; the generic words where
    they agree or one is missing (the start weights, checked before, or the model differ)."""
    from omegaconf import OmegaConf

    from workbench.store import describe_differences

    try:
        a, b = (OmegaConf.to_container(OmegaConf.create(y or "")) or {} for y in (stored_yaml, yaml))
    except Exception:
        a = b = None
    probe = lambda cfg: {"probe": (cfg or {}).get("probe") or {}}  # noqa: E731
    what = describe_differences(probe(a), probe(b)) if a is not None and probe(a) != probe(b) else ""
    return what or "the probe settings agree; the model or its schedule differ: see the store's attr config_yaml"


class TrainingProbes:
    """The probe set of a training run and its store."""

    def __init__(self, *, spec, schedule, prompts: list[str], seeds: list[int], num_frames: int, latent_hw,
                 channels: int, frame_seq_len: int, grid, text_len: int, nfpb: int, timesteps: torch.Tensor,
                 scheduler, context_noise: float, every: int, path, attrs: dict, fingerprint: str,
                 sample_meta: dict, independent_first_frame: bool = False, fields: dict | None = None):
        self.spec, self.schedule, self.prompts, self.seeds = spec, schedule, prompts, seeds
        self.num_frames, self.latent_hw, self.channels = num_frames, tuple(latent_hw), channels
        self.timesteps, self.scheduler, self.context_noise, self.every = timesteps, scheduler, context_noise, every
        self.layout = StoreLayout(steps=[s for s in schedule if s.step in spec.steps], layers=list(spec.layers),
                                  heads=list(spec.heads), token_layers=list(spec.token_layers), num_frames=num_frames,
                                  num_frame_per_block=nfpb, frame_seq_len=frame_seq_len, grid=tuple(grid),
                                  text_len=text_len, stats=list(spec.stats), attrs=attrs,
                                  independent_first_frame=independent_first_frame)
        self.frame_seq_len, self.text_len = frame_seq_len, text_len
        self.sample_meta = sample_meta
        self.path, self.fingerprint, self.fields = Path(path), fingerprint, fields  # (fields: by name, for messages)
        self.writer: ProbeStoreWriter | None = None
        self.embeddings = None

    def open(self, main: bool, resume_step: int | None) -> None:
        if main:
            if resume_step == -1:  # a restart from step 0 (no checkpoint was made): the stopped run's probes go,
                # whatever settings they had, when this run's first probe is in (the old store stays until then)
                self.writer = ProbeStoreWriter(self.path, self.fingerprint, self.fields, mode="overwrite")
                return
            self._check_start_weights()
            self.writer = ProbeStoreWriter(self.path, self.fingerprint, self.fields)
            if resume_step is not None:
                self.writer.keep_until(resume_step)
            elif self.writer.completed:
                raise TrainingError(f"{self.path} already holds probes of an earlier run; use --resume or a new logdir")

    def check_store(self, restart: bool = False) -> None:
        """Before any weights load: a probe store of a run that started from other weights, or of other probe
        settings (they may change on a resume: training/checkpoints.py CHANGEABLE_ON_RESUME), is refused, naming
        what differs. The writer checks again when it opens the store (`open`). `restart`: a --resume from step 0
        (no checkpoint was made), which replaces the stopped run's probes: nothing to check."""
        import zarr

        from workbench.store import describe_differences

        if restart:
            return
        self._check_start_weights()
        try:
            attrs = dict(zarr.open_group(self.path, mode="r").attrs)
        except Exception:  # (no store yet, or not one: the writer says)
            return
        if "completed_train_steps" in attrs and attrs.get("fingerprint") != self.fingerprint:
            stored = attrs.get("fingerprint_fields") or {}
            # (a store made before its settings were recorded by name: the probe settings of its config)
            what = (describe_differences(stored, self.fields) if "layout" in stored else
                    _probe_differences(attrs.get("config_yaml"), self.layout.attrs.get("config_yaml")))
            raise TrainingError(f"{self.path} holds probes of other settings ({what}); {OTHER_STORE}")

    def _check_start_weights(self) -> None:
        """A probe store of a run that started from other weights (generator_ckpt replaced since the run began, or
        another run's logdir) is named so, before the store's generic refusal (a fingerprint: no setting named)."""
        import zarr

        try:
            attrs = dict(zarr.open_group(self.path, mode="r").attrs)
        except Exception:  # (no store yet, or not one: the writer says)
            return
        stored = ((attrs.get("fingerprint_fields") or {}).get("model") or {}).get("weights")
        mine = self.sample_meta["checkpoint_sha256"]
        if attrs.get("fingerprint") != self.fingerprint and isinstance(stored, str) and stored != mine:
            raise TrainingError(f"{self.path} holds the probes of a run that started from weights of sha256 "
                                f"{stored[:12]}...; this run's start weights ({self.sample_meta['checkpoint']}) hash "
                                f"{mine[:12]}...: the file was replaced since that run started, or the logdir is "
                                "another run's; give the file it started from, or use a new logdir")

    def close(self) -> None:
        """Release the store (its writer holds the store's lock while training runs)."""
        if self.writer is not None:
            self.writer.close()

    def due(self, step: int, d) -> bool:
        """Whether a probe runs at this step (the same answer on every rank)."""
        if not self.every or step % self.every:
            return False
        done = [1 if (self.writer is not None and self.writer.done(step)) else 0]
        return not d.broadcast_list(done)[0]

    def run(self, model, step: int, prompt_cache, d, dtype) -> dict:
        """Run the probe set on the (possibly sharded) causal model; rank 0 appends it. Returns a small summary."""
        from models.common.rollout import causal_few_step, seeded_noise
        from workbench.capture import Geometry, StatsProbe
        from workbench.sample import capture_sample

        device = d.device
        if self.embeddings is None:
            self.embeddings = prompt_cache.embeddings(self.prompts)
        F, (h, w) = self.num_frames, self.latent_hw
        per_stat: dict[str, list] = {}
        metas = []
        with preserved_rng(device), torch.no_grad():
            for i, prompt in enumerate(self.prompts):
                context = self.embeddings.context[i : i + 1].to(device, dtype)
                for seed in self.seeds:
                    noise, gen = seeded_noise(seed, (1, F, self.channels, h, w), device, dtype)
                    geo = Geometry(batch=1, num_frames=F, frame_seq_len=self.frame_seq_len, text_len=self.text_len)
                    probe = StatsProbe(self.spec, geo, device)
                    # eager: a (possibly sharded) model whose weights change between probe runs keeps no graphs
                    arrays = capture_sample(model, probe, lambda: causal_few_step(
                        model, noise, context, timesteps=self.timesteps, scheduler=self.scheduler,
                        context_noise=self.context_noise, generator=gen, cache_frames=F, cuda_graphs=False), F)
                    for stat, values in arrays.items():
                        per_stat.setdefault(stat, []).append(values)
                    metas.append(dict(self.sample_meta, prompt_index=i, seed=seed, prompt=prompt,
                                      tokens=self.embeddings.tokens[i], num_tokens=self.embeddings.lengths[i]))
        summary = {}
        if self.writer is not None:
            from models.common.attention_kernels import describe, refusals

            kernel, mc = getattr(model, "attention_kernel", "auto"), model.config
            backend = describe(str(device), dtype, kernel, heads=mc.num_heads, head_dim=mc.head_dim,
                               frame_seq_len=self.frame_seq_len)  # (the probe rollouts run without autograd)
            self.layout.attrs.update(dtype=str(dtype).removeprefix("torch."), attn_backend=backend)
            samples = [sample_dataset(self.layout, meta, {s: per_stat[s][j] for s in per_stat})
                       for j, meta in enumerate(metas)]
            ds = xr.concat(samples, dim="sample", data_vars="all", coords="different", compat="equals",
                           combine_attrs="override")
            ds = ds.expand_dims(train_step=np.array([step], dtype=np.int64))
            ds["train_step"].attrs.update(COORD_ATTRS["train_step"])
            for name in list(ds.data_vars):  # expand_dims puts train_step first for data variables only
                ds[name].attrs = samples[0][name].attrs
            ds.attrs.pop("completed", None)
            refused = refusals(kernel, device, dtype, heads=mc.num_heads, head_dim=mc.head_dim)
            self.writer.write(ds, step, facts={"attn_refused": refused})
            if "attn_mass" in ds:
                summary = mass_summary(ds.attn_mass)
        return summary


def mass_summary(mass: xr.DataArray) -> dict:
    """Mean attention mass on frame 0, on the query's own chunk, and on the other earlier frames (the regions of
    workbench/summary.py), over train steps, samples, captured denoising steps, layers, heads and counted query
    frames; NaN cells (frames not attended) count as 0."""
    from workbench.summary import frame0_own_rest

    if not (mass.phase == "denoise").any():
        return {}
    first, own, rest = frame0_own_rest(mass.fillna(0))
    return {"probe_mass_frame0": float(first.mean()), "probe_mass_own_chunk": float(own.mean()),
            "probe_mass_rest": float(rest.mean())}

"""The zoo's outputs: the shipped folder in data/embedded's layout (`ship`), its ZOO.md, and the tar parts that
carry the zoo and a run's resumable state off a GPU machine (`write_tars`). Used by training/zoo.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import torch

PART_BYTES = 15 * 2 ** 20  # tar parts of at most 15 MiB: a GPU call returns files of at most 16 MiB


def copy_text_and_vae(source: Path, vae_file: Path, folder: Path) -> None:
    """The umT5 encoder and tokenizer of `source` and the VAE file into the Wan folder `folder`."""
    from models.wan.text_encoder import TOKENIZER_SUBDIR
    from models.wan.text_encoder import WEIGHTS_NAME as T5_WEIGHTS_NAME

    folder.mkdir(parents=True, exist_ok=True)
    tok = folder / TOKENIZER_SUBDIR
    if tok.exists():
        shutil.rmtree(tok)
    shutil.copytree(source / TOKENIZER_SUBDIR, tok)
    for src, name in ((source / T5_WEIGHTS_NAME, T5_WEIGHTS_NAME), (vae_file, "Wan2.1_VAE.pth")):
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, folder / name)


def ship(teacher_dir: Path, out: Path, report: dict, configs: dict) -> Path:
    """Write the zoo in data/embedded's layout into `out`: the Wan folder (teacher DiT in bf16, umT5, tokenizer,
    VAE), the students' checkpoints in bf16 (optimiser-free, keys as written by the trainer) and
    checkpoints/ZOO.md (how each model was trained)."""
    from models.wan.checkpoint import WEIGHTS_NAME, read_wan_folder, save_self_forcing, save_wan_folder
    from models.wan.config import default_video_size
    from models.wan.embedded import ZOO, ZOO_MARKER
    from models.files import atomic_write, load_tensors
    from models.wan.text_encoder import TOKENIZER_SUBDIR
    from models.wan.text_encoder import WEIGHTS_NAME as T5_WEIGHTS_NAME

    out.mkdir(parents=True, exist_ok=True)
    config, state = read_wan_folder(teacher_dir)
    copy_text_and_vae(teacher_dir, teacher_dir / "Wan2.1_VAE.pth", out)
    save_wan_folder(out, config, {k: v.to(torch.bfloat16) for k, v in state.items()},
                    video_size=default_video_size(teacher_dir))
    shipped = {"teacher"}
    for entry in ZOO.values():
        src = entry.checkpoint_path(teacher_dir)
        if src is None or not src.is_file():
            continue
        shipped.add(entry.name)
        blob = load_tensors(src)
        parts = {k: {n.removeprefix("model."): t.to(torch.bfloat16) for n, t in blob[k].items()}
                 for k in ("generator", "generator_ema", "critic") if k in blob}
        save_self_forcing(entry.checkpoint_path(out), **parts)
    # how each stage ran (its own device, steps, seconds, losses, the check): not the calling run's top-level keys,
    # which say only where the last call (often this ship alone) ran
    atomic_write(out / "checkpoints" / "zoo_report.json",
                 lambda p: Path(p).write_text(json.dumps({"stages": report["stages"]}, indent=1)))
    atomic_write(out / ZOO_MARKER, lambda p: Path(p).write_text(zoo_markdown(report, configs, shipped)))
    assert (out / WEIGHTS_NAME).is_file() and (out / T5_WEIGHTS_NAME).is_file() and (out / TOKENIZER_SUBDIR).is_dir()
    return out


def zoo_markdown(report: dict, configs: dict, shipped: set[str]) -> str:
    """checkpoints/ZOO.md: what each shipped model (`shipped`: zoo names) is and how it was trained (from the
    driver's report)."""
    from models.wan.embedded import ZOO
    from training.word_check import describe

    lines = ["# The embedded zoo", "",
             "Trained on the miniature world (models/world.py) by `python3 -m training.zoo` (training/zoo.py;",
             "docs/zoo.md). Each model: `workbench generate --model NAME`; the models not listed are not trained yet.",
             "", "| name | what | file | config | steps | seconds (device) | losses (first -> last) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in ZOO.items():
        st = report["stages"].get(name, {})  # each zoo model is trained by the stage of its name
        if "steps" not in st or name not in shipped:
            continue
        losses = ", ".join(f"{k} {v['first']} -> {v['last']}" for k, v in st.items() if k.endswith("_loss"))
        calls = f", {st['calls']} calls" if st.get("calls", 1) > 1 else ""
        lines.append(f"| {name} | {entry.description} | {entry.checkpoint or 'diffusion_pytorch_model.safetensors'} "
                     f"| {configs[name]} | {st.get('steps_total', st['steps'])} | {st.get('seconds_total', st.get('seconds'))} "
                     f"({st.get('device', report.get('device'))}{calls}) | {losses} |")
    check = report["stages"].get("check", {})
    if check:
        lines += ["", "Quick check (training/zoo_check.py `quick_track`, the 32 prompts of the grid, seed 0; words: the",
                  "word check of training/word_check.py, flow error with the word swapped / with the true prompt).",
                  "Its shape test (the object fills more than 0.89 of its bounding box) reads most decoded squares,",
                  "whose corners the VAE softens, as circles, so the shape column stays near 0.5 for every model: it",
                  "is a smoke test of the training log. Adherence is measured by `workbench evaluate` (the tracker of",
                  "studies/world_metrics.py), whose numbers docs/zoo.md gives:",
                  "", "| model | colour | shape | direction | all three | words |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {r['colour']} | {r['shape']} | {r['direction']} | {r['all']} | "
                  f"{describe(r['words']) if 'words' in r else ''} |"
                  for n, r in check.items() if isinstance(r, dict) and "colour" in r]
    return "\n".join(lines) + "\n"


def resumable_checkpoints(work: Path) -> list[Path]:
    """The files of the latest trainer checkpoint (weights, EMA and optimiser states) of each training stage
    that its time share cut short (the report says stopped_early), so that `--continue STAGE` on a fresh
    machine resumes it where it stopped."""
    from training.checkpoints import latest_checkpoint

    report = work / "zoo_report.json"
    stages = json.loads(report.read_text()).get("stages", {}) if report.is_file() else {}
    files = []
    for stage in ("teacher", "df", "ode", "dmd", "sid", "gan"):
        folder = latest_checkpoint(work / "logs" / stage) if stages.get(stage, {}).get("stopped_early") else None
        if folder is not None:
            files += sorted(f for f in folder.iterdir() if f.is_file())
    return files


def write_tars(work: Path, out: Path, log=print) -> list[Path]:
    """zoo_state.tar.* (paths relative to the work folder: the teacher folder with every student trained so far,
    float32, the report and the resumable trainer checkpoints) and, after ship, zoo_embedded.tar.* (paths
    relative to the repository root), in parts of at most PART_BYTES."""
    written = []
    state_files = [f for f in sorted((work / "teacher").rglob("*")) if f.is_file() and not f.name.startswith(".")]
    state_files += [f for f in [work / "zoo_report.json"] if f.is_file()]
    state_files += resumable_checkpoints(work)
    jobs = [("zoo_state.tar", [(f, f.relative_to(work)) for f in state_files])]
    ship_dir = work / "ship"
    if (ship_dir / "data" / "embedded").is_dir():
        jobs.append(("zoo_embedded.tar", [(f, f.relative_to(ship_dir)) for f in sorted(ship_dir.rglob("*"))
                                          if f.is_file()]))
    for name, files in jobs:
        tar = work / name
        with tarfile.open(tar, "w") as t:
            for f, arc in files:
                t.add(f, arcname=str(arc))
        data = tar.read_bytes()
        for i in range(0, len(data), PART_BYTES):
            part = out / f"{name}.{i // PART_BYTES:02d}"
            part.write_bytes(data[i:i + PART_BYTES])
            written.append(part)
        log(f"wrote {name} ({len(data) / 2**20:.1f} MiB) as {-(-len(data) // PART_BYTES)} part(s) in {out}")
    return written

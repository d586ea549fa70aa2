"""What a new user hit (issue 13), command by command:

- bad input and unwritable outputs, in one table: every command ends in one line `workbench CMD: error: ...`
  naming the bad value, exits non-zero, prints no traceback, and does no work first (the expensive steps are
  replaced by functions that fail the test if reached);
- files are written with the permissions of any new file (0666 less the umask), not mkstemp's 0600;
- a prompt longer than the text encoder's 512 tokens gets one warning line saying where it is cut;
- --height/--width (pixels) for extract and generate, defaulting to the model folder's own size;
- the extract summary: per layer and head (never a head index averaged across layers), ranges for long step
  lists, no -0.000.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench.extract as extract_mod
from models.wan.embedded import EMBEDDED_DIR
from studies import synthetic
from workbench.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return synthetic.write_store(tmp_path_factory.mktemp("s") / "s.zarr", "causal", layers=(0, 1), num_heads=4)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as its work."""
    import models.wan.checkpoint
    import studies.report
    import training.build
    import training.ode_pairs
    import workbench.legacy

    def refuse(*a, **kw):
        raise AssertionError("work started before the request was checked")

    for module, name in ((extract_mod, "load_wan"), (extract_mod, "weights_sha256"),
                         (extract_mod, "sha256_file"), (models.wan.checkpoint, "load_wan"),
                         (studies.report, "build_report"), (studies.report, "build_compare_report"),
                         (workbench.legacy, "legacy_record"), (training.build, "build_trainer"),
                         (training.ode_pairs, "build_ode_pairs")):
        monkeypatch.setattr(module, name, refuse)


# {store}: a synthetic store; {blocked}: a path under a regular file, unwritable even for root
CASES = [
    # (the hint named --independent-first-frame, which intervene does not have)
    (["intervene", "--ablate", "3:0", "--frames", "4", "--out", "{tmp}/x.zarr"],
     "--frames 4 does not divide into chunks of 3; use a multiple of 3 (e.g. 3 or 6); intervene runs chunks of equal "
     "size only"),
    (["extract", "--layer", "3", "--model", "ckpts/dmd.pt"], "a checkpoint file is --checkpoint PATH"),
    (["extract", "--layers", "3-"], "layer '3-': use a number, a range like 0-29"),
    (["extract", "--layers", "1,,2"], "layer '1,,2': use a number"),
    (["extract", "--layer", "3", "--seed", "1-"], "seed '1-': use a number"),
    (["extract", "--layer", "3", "--heads", "-1"], "head '-1': use a number"),
    (["extract", "--layer", "3", "--height", "100"], "--height 100: use a positive multiple of 16 pixels"),
    (["extract", "--layer", "3", "--width", "0"], "--width 0: use a positive multiple of 16 pixels"),
    (["generate", "--prompt", "x", "--height", "90", "--out", "{tmp}/g"], "--height 90: use a positive multiple of 16"),
    (["info", "--width", "100"], "--width 100: use a positive multiple of 16"),
    (["extract", "--layer", "3", "--use-ema"], "--use-ema picks the generator_ema weights of a Self-Forcing"),
    (["generate", "--prompt", "x", "--use-ema", "--out", "{tmp}/g"], "give it with --checkpoint FILE"),
    (["extract", "--layer", "3", "--checkpoint", "{tmp}"], "--checkpoint '{tmp}' is a directory"),
    (["generate", "--prompt", "x", "--checkpoint", "{tmp}", "--out", "{tmp}/g"], "--checkpoint '{tmp}' is a directory"),
    (["generate", "--prompt", "x", "--checkpoint", "{tmp}/no.pt", "--out", "{tmp}/g"], "'{tmp}/no.pt' does not exist"),
    (["extract", "--layer", "3", "--checkpoint", "/dev/null"], "'/dev/null' is not a regular file (give a .pt or"),
    (["export-legacy", "{store}", "--layers", "0-"], "layer '0-': use a number"),
    (["extract", "--layer", "3", "--config", "{tmp}/no.yaml"], "config file '{tmp}/no.yaml' does not exist"),
    (["generate", "--config", "configs/self_forcing_dmd.yaml", "--denoising-step-list", "1000,x", "--out", "{tmp}/g"],
     "--denoising-step-list '1000,x': give timesteps in 0..1000 separated by commas"),
    (["intervene", "--ablate", "3:0", "--denoising-step-list", "1001", "--out", "{tmp}/x.zarr"],
     "--denoising-step-list [1001]: give timesteps in 0..1000"),
    (["generate", "--prompt", "x", "--context-noise", "-5", "--out", "{tmp}/g"],
     "--context-noise -5: give a timestep in 0..1000"),
    (["intervene", "--ablate", "3:0", "--timestep-shift", "0", "--out", "{tmp}/x.zarr"],
     "--timestep-shift 0: give a number > 0"),
    (["generate", "--prompt", "x", "--seed", "all", "--out", "{tmp}/g"], "seed 'all': give numbers"),
    (["generate", "--prompt", "  ", "--out", "{tmp}/g"], "no prompts to run (an empty prompt"),
    (["intervene", "--ablate", "3:0", "--frames", "0", "--out", "{tmp}/x.zarr"],
     "--frames 0: give a positive number of latent frames"),
    (["extract", "--layer", "3", "--frames", "-3"], "--frames -3: give a positive number of latent frames"),
    (["generate", "--prompt", "x", "--frames", "0", "--out", "{tmp}/g"], "--frames 0: give a positive number"),
    (["info", "--frames", "0"], "--frames 0: give a positive number"),
    (["generate", "--prompt", "x", "--frames", "12", "--local-attn-size", "4", "--sink-size", "3", "--out", "{tmp}/g"],
     "--local-attn-size 4: the window must hold the sink (3 frames) and a chunk (3 frames): at least 6"),
    (["intervene", "--spec", "{tmp}/none.yaml", "--out", "{tmp}/x.zarr"],
     "--spec {tmp}/none.yaml: No such file or directory"),
    (["intervene", "--policy", "fifo:21", "--frames", "9", "--out", "{tmp}/x.zarr"],
     "cache policy fifo (window 21, sink_frames 0) holds 21 frames: all 9 frames of the rollout fit, and it never "
     "evicts or moves a frame, so it changes nothing"),
    (["extract", "--layer", "3", "--out", "{blocked}/x.zarr"], "output folder '{blocked}' is a file, not a folder"),
    (["generate", "--prompt", "x", "--out", "{blocked}/g"],
     "output folder '{blocked}/g' is not writable ('{blocked}', on its way, is a file)"),
    (["report", "{store}", "--out", "{blocked}/r.html"], "output folder '{blocked}' is a file, not a folder"),
    (["compare", "{store}", "{store}", "--out", "{blocked}/c.html"],
     "output folder '{blocked}' is a file, not a folder"),
    (["export-legacy", "{store}", "--out", "{blocked}/legacy"], "output folder '{blocked}/legacy' is not writable"),
    (["train", "--config", "configs/tiny_dmd.yaml", "--logdir", "{blocked}/log"],
     "output folder '{blocked}/log' is not writable"),
    (["train", "--config", "configs/tiny_ode.yaml", "--logdir", "{tmp}/log", "--make-ode-pairs", "--set",
      "data_path={blocked}/pairs.pt"], "output folder '{blocked}' is a file, not a folder"),
    (["generate", "--prompt", "x", "--sampler", "causal_multi_step_cfg", "--guidance-scale", "nan", "--out", "{tmp}/g"],
     "--guidance-scale nan: give a finite number"),
    (["extract", "--layer", "3", "--sampler", "causal_multi_step_cfg", "--num-inference-steps", "0"],
     "--num-inference-steps 0: give 1 or more"),
    (["generate", "--prompt", "x", "--sink-size", "-1", "--out", "{tmp}/g"], "--sink-size -1: give 0 or more frames"),
    (["train", "--config", "{tmp}/broken.yaml", "--logdir", "{tmp}/log"],
     "config file '{tmp}/broken.yaml' is not YAML (did not find expected node content, line 2)"),
    (["generate", "--prompt", "x", "--config", "{tmp}/broken.yaml", "--out", "{tmp}/g"], "is not YAML"),
    (["train", "--config", "configs/tiny_dmd.yaml", "--logdir", "{tmp}/log", "--set", "lr"],
     "--set lr: give KEY=VALUE"),
    (["intervene", "--spec", "{tmp}/spec.yaml", "--out", "{tmp}/x.zarr"],
     "--spec {tmp}/spec.yaml: interventions: 5; give a list of mappings"),
    (["view", "{store}", "--port", "99999"], "--port 99999: give a port in 0..65535"),
    (["report", "{store}", "--out", "{tmp}"], "--out '{tmp}' is a folder; give the HTML file to write"),
    (["compare", "{store}", "{store}", "--out", "{tmp}/c.csv"],  # (the page and its table: one file, one lost)
     "--out '{tmp}/c.csv' names the HTML page, beside which a report writes its table (.csv) or figure (.png) under "
     "the page's name; give e.g. '{tmp}/c.html'"),
    (["report", "{store}", "--out", "{tmp}/r.PNG"], "or figure (.png) under the page's name; give e.g. '{tmp}/r.html'"),
    (["extract", "--layer", "3", "--prompts", "{tmp}"], "prompt file {tmp} is a folder"),
    (["extract", "--layer", "3", "--token-layers", "all"], "--token-layers all names the layers of attn_key_token"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a).replace("{", "").replace("}", "") for a, _ in CASES])
def test_bad_input_is_one_line_before_any_work(argv, message, tmp_path, store, capsys, no_work, monkeypatch):
    monkeypatch.chdir(REPO)
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    (tmp_path / "broken.yaml").write_text("lr: [\n")
    (tmp_path / "spec.yaml").write_text("interventions: 5\n")
    fill = dict(store=str(store), blocked=str(blocked), tmp=str(tmp_path))
    argv = [a.format(**fill) for a in argv]
    if argv[0] == "extract":
        argv += ["--no-progress"] + ([] if "--out" in argv else ["--out", str(tmp_path / "x.zarr")])
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith(f"workbench {argv[0]}: error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err and "Traceback" not in err
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "g").exists()  # no output folder made


def refuse_writes_into(folder: Path, monkeypatch) -> None:
    """Make creating a file or folder directly in `folder` fail with EACCES, as the kernel does for a read-only
    folder to anyone but root: root ignores the mode bits, and CI runs the tests as root."""
    folder = os.path.abspath(folder)

    def in_folder(path) -> bool:
        return os.path.dirname(os.path.abspath(os.fsdecode(path))) == folder

    def refused(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_mkdir, real_open = os.mkdir, os.open

    def mkdir(path, *args, **kwargs):
        if in_folder(path):
            raise refused(path)
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and in_folder(path):
            raise refused(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)  # (Path.mkdir and os.makedirs call it)
    monkeypatch.setattr(os, "open", open_)  # (tempfile.mkstemp, the write probe, calls it)


@pytest.mark.parametrize("command", ["extract", "report", "export-legacy", "train"])
def test_a_read_only_folder_is_one_line_before_any_work(command, tmp_path, store, capsys, no_work, monkeypatch):
    monkeypatch.chdir(REPO)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # (any other user meets the kernel's own refusal)
        refuse_writes_into(folder, monkeypatch)
    argv = {"extract": ["extract", "--layer", "3", "--out", str(folder / "x.zarr"), "--no-progress"],
            "report": ["report", str(store), "--out", str(folder / "r.html")],
            "export-legacy": ["export-legacy", str(store), "--out", str(folder / "legacy")],
            "train": ["train", "--config", "configs/tiny_dmd.yaml", "--logdir", str(folder / "log")]}[command]
    try:
        assert cli_main(argv) != 0
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith(f"workbench {command}: error: ") and err.count("\n") == 1 and "not writable" in err
    if command in ("export-legacy", "train"):  # (a folder yet to be made: the one that refused it is named)
        assert f"(it would be made in {str(folder)!r}, which takes no new files)" in err


def test_a_store_whose_array_folders_take_no_files_is_refused_before_any_work(tmp_path, store, monkeypatch):
    """A colleague's store made under umask 022 and opened up with `chmod g+w` on its top folder only: the lock
    and the top folder take files, its arrays' folders do not. Resuming it failed at the first append, after the
    model work, with a bare "Permission denied (.../zarr.HEX.partial)" and exit status 1; it is refused when the
    store is opened, naming the folders and the fix (a read-only mount reads the same through os.access)."""
    import models.files
    from models.errors import ModelInputError
    from workbench.store import StoreWriter
    from workbench.store_lock import lock_file

    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    denied = copy / "attn_mass"
    real_access = os.access
    monkeypatch.setattr(models.files.os, "access",  # (root passes any permission bits: the folder is denied here)
                        lambda p, mode, **kw: Path(p) != denied and real_access(p, mode, **kw))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ModelInputError, match="not writable inside") as refused:
        StoreWriter(copy, "another fingerprint", mode="resume", log=lambda *a: None)
    assert repr(str(denied)) in str(refused.value) and "chmod -R g+w" in str(refused.value)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p != lock_file(copy))
    assert after == [b for b in before if tmp_path / b != lock_file(copy)]  # nothing written or rewritten
    assert not (tmp_path / ".s.zarr.lock.json").exists()  # the lock let go


@pytest.mark.parametrize("command", ["extract", "generate", "info", "intervene", "evaluate", "extract --model ode",
                                     "train"])
def test_an_install_without_the_repositorys_data_says_so(command, tmp_path, capsys, no_work, monkeypatch):
    """`pip install` without -e copies the packages, not data/embedded or configs/: each command says that, and how
    to install or where to point, in one line (it said --wan-dir '.../site-packages/data/embedded' does not exist,
    a flag nobody gave)."""
    import models.wan.embedded as embedded
    import training.config

    monkeypatch.setattr(embedded, "EMBEDDED_DIR", tmp_path / "site-packages" / "data" / "embedded")
    monkeypatch.setitem(training.config.load_config.__kwdefaults__, "default",
                        tmp_path / "site-packages" / "configs" / "default_config.yaml")
    argv = {"evaluate": ["evaluate", "--model", "embedded", "--out", str(tmp_path / "e")],
            "train": ["train", "--config", str(REPO / "configs" / "tiny_dmd.yaml"), "--logdir", str(tmp_path / "t")],
            "intervene": ["intervene", "--knockout", "0", "--out", str(tmp_path / "i.zarr")],
            }.get(command, command.split() + ["--out", str(tmp_path / "x")] * (command != "info"))
    assert cli_main(argv + ["--no-progress"] * (command not in ("info", "train"))) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`pip install` without -e does not copy" in err, err
    assert ("WORKBENCH_EMBEDDED_DIR" in err) == (command != "train")


def test_a_store_named_dot_and_a_folder_that_is_no_store(tmp_path, store, capsys, monkeypatch):
    """`workbench report .` inside a store writes the report beside it (it crashed: Path('.') has no name); a folder
    that holds no store is said to be one, not "replaced after it was opened"."""
    shutil.copytree(store, tmp_path / "x.zarr")
    monkeypatch.chdir(tmp_path / "x.zarr")
    assert cli_main(["report", "."]) == 0 and (tmp_path / "x.html").is_file()
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "p0000-s0.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    for folder, what in (("gen", "a folder of `workbench generate` outputs"), ("empty", "a folder")):
        assert cli_main(["report", str(tmp_path / folder)]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is {what}, not a store (no zarr.json)" in err, err


def test_a_lock_file_of_another_user_is_named_with_its_owner(tmp_path, capsys, no_work, monkeypatch):
    """Two users of a shared folder under umask 022: the second may not write the first's lock file, and was told
    'Permission denied (.../.x.zarr.lock)'; now whose it is and what to do."""
    import filelock

    def refused(self, *args, **kw):
        raise PermissionError(13, "Permission denied", self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", refused)
    (tmp_path / ".x.zarr.lock").write_bytes(b"")
    for writable, advice in ((False, "g+w"), (True, "only its owner may open it: ask them to remove it")):
        monkeypatch.setattr(os, "access", lambda *a, **k: writable)  # (writable, or a sticky folder: chmod won't do)
        assert cli_main(["extract", "--layer", "3", "--out", str(tmp_path / "x.zarr"), "--no-progress"]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "its lock file" in err and "belongs to user" in err and advice in err, err


def test_no_home_directory_only_costs_the_memo_of_file_hashes(tmp_path, monkeypatch):
    """A container's user without a passwd entry or HOME: Path.home() raises, and importing models.files did too
    (every command failed); now the whole-file reads are just not remembered."""
    from models import files

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("WORKBENCH_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert files.default_memo_dir() is None
    (tmp_path / "w.bin").write_bytes(b"abc")
    assert files.sha256_file(tmp_path / "w.bin").startswith("ba7816bf")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    assert files.default_memo_dir() == tmp_path / "cache"
    files.sha256_file(tmp_path / "w.bin")
    assert (tmp_path / "cache" / "file_hashes.json").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_have_the_permissions_of_new_files(umask, tmp_path, store):
    """Atomic writes create their temporary file the ordinary way, so the umask decides (not mkstemp's 0600)."""
    from safetensors.torch import save_file

    from models.files import atomic_write, atomic_write_bytes
    from models.video import write_png_grid
    from models.wan.checkpoint import save_self_forcing
    from studies.report import build_report
    from training.data import save_latent_dataset
    from workbench.legacy import export_legacy

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "bytes.bin", b"x")
        write_png_grid(torch.zeros(3, 2, 8, 8), tmp_path / "grid.png")
        save_self_forcing(tmp_path / "model.pt", generator={"w": torch.zeros(2)})
        atomic_write(tmp_path / "latents.safetensors", lambda p: save_file({"x": torch.zeros(2)}, p))  # (0600 alone)
        save_latent_dataset(tmp_path / "latents.pt", ["a"], torch.zeros(1, 2), "latents")
        paths = export_legacy(store, tmp_path / "legacy", layers=[0], log=lambda *_: None)
        build_report(store, tmp_path / "r.html", layer=0)
        with extract_mod.StoreLock(tmp_path / "new.zarr"):
            locked = [tmp_path / ".new.zarr.lock", tmp_path / ".new.zarr.lock.json"]
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in locked}
    finally:
        os.umask(old)
    files = ["bytes.bin", "grid.png", "model.pt", "latents.pt", "r.html", "latents.safetensors"]
    modes.update({name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in files})
    modes.update({str(p): stat.S_IMODE(p.stat().st_mode) for p in paths})
    assert modes == {name: 0o666 & ~umask for name in modes}


def test_a_prompt_longer_than_the_text_encoder_reads_is_one_warning(tmp_path, capsys):
    """Truncated as Wan2.1 truncates it (a warning, not an error: the model sees what the Wan2.1 and
    Self-Forcing pipelines show it), said once, with where it is cut; the store records the 512 tokens the
    model read."""
    from workbench.store import open_store

    prompt = " ".join(["a small red fox jumps over the lazy dog"] * 70)
    prompts = tmp_path / "long.txt"
    prompts.write_text(prompt + "\n")
    out = tmp_path / "long.zarr"
    assert cli_main(["extract", "--layer", "0", "--frames", "3", "--steps", "0", "--prompts", str(prompts),
                     "--seed", "1,2", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("workbench extract: warning: prompt 'a small red fox")
    assert "the text encoder reads the first 512 (as Wan2.1 does), so it is cut after '..." in err[0]
    assert open_store(out).num_tokens.values.tolist() == [512, 512]


def test_a_wan_folder_runs_at_its_own_size_unless_told(tmp_path):
    """A copy of the embedded folder (an official-format Wan folder) runs at its own 96 x 128 (it records
    video_size), not at Wan2.1's 480 x 832; --height/--width choose another size for extract and generate."""
    from safetensors.torch import load_file

    folder = shutil.copytree(EMBEDDED_DIR, tmp_path / "small_wan")
    p = extract_mod.plan(extract_mod.ExtractConfig(wan_dir=str(folder)))
    assert p.geometry == (21, 12, 16) and p.frame_seq_len == 48
    wan_size = shutil.copytree(folder, tmp_path / "wan_size")  # a folder that records no size: Wan2.1's
    config = json.loads((wan_size / "config.json").read_text())
    del config["video_size"]
    (wan_size / "config.json").write_text(json.dumps(config))
    assert extract_mod.plan(extract_mod.ExtractConfig(wan_dir=str(wan_size))).geometry == (21, 60, 104)
    out = tmp_path / "s.zarr"
    assert cli_main(["extract", "--wan-dir", str(folder), "--height", "64", "--width", "96", "--layer", "0",
                     "--frames", "3", "--steps", "0", "--out", str(out), "--no-progress"]) == 0
    from workbench.store import open_store

    assert open_store(out).attrs["frame_seq_len"] == (64 // 16) * (96 // 16)
    assert cli_main(["generate", "--wan-dir", str(folder), "--height", "64", "--width", "96", "--frames", "3",
                     "--prompt", "x", "--no-video", "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    assert load_file(str(tmp_path / "g" / "p0000-s0.safetensors"))["latents"].shape == (3, 16, 8, 12)


def test_extract_summary_of_a_window_without_a_sink_sums_to_one(tmp_path):
    """With a window and no sink frame 0 leaves the cache: its cells are NaN for later queries and count as 0. The
    summary averaged frame 0 (and the rest) over the queries that still saw it only, so a planted sink head read
    as 1.0 on frame 0 and the columns summed past 1."""
    from workbench.summary import summary_table

    store = synthetic.write_store(tmp_path / "w.zarr", "window", layers=(0,), num_heads=4, local_attn_size=9,
                                  sink_size=0)
    rows = [[float(v) for v in line.split()[2:5]] for line in summary_table(store).splitlines()
            if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 4
    for frame0, own, rest in rows:
        assert frame0 + own + rest == pytest.approx(1.0, abs=2e-3)
    assert max(r[0] for r in rows) < 0.5  # (frame 0 is attended by the first 9 frames' queries only)
    # uniform attention's share of frame 0 counted the same way (0 where evicted): it took 1/n of every row, frame
    # 0 attended or not, and so called a head drawn to frame 0 at 4x its fair share barely above chance
    from workbench.store import open_store

    ds = open_store(store)
    m = ds.attn_mass.where(ds.phase == "denoise", drop=True).values[..., ds.query_chunk.values > 0, :]
    uniform = (~np.isnan(m[..., 0]) / (~np.isnan(m)).sum(-1)).mean()
    assert uniform < 0.05 and f"uniform attention would give it {uniform:.2f})" in summary_table(store)


def test_a_store_of_context_passes_only_gets_no_table_and_its_own_report(tmp_path, capsys):
    """`--steps 4` captures the causal sampler's context passes only: the summary averages denoising steps, so it
    printed a table of nan and named heads from it; it says why there is none. The report opens at the first
    captured step (its default was step 0, which such a store lacks)."""
    from workbench.cli import main as cli_main

    out = tmp_path / "c.zarr"
    assert cli_main(["extract", "--layer", "3", "--steps", "4", "--frames", "6", "--out", str(out),
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "no summary: it averages denoising steps, and every step captured is a context pass" in text
    assert "nan" not in text and "most local" not in text
    assert cli_main(["report", str(out), "--out", str(tmp_path / "c.html")]) == 0
    assert "step 4 (t=0, context)" in (tmp_path / "c.html").read_text()


def test_extract_summary_is_per_layer_and_head(tmp_path):
    """Planted heads (studies.synthetic): layer 0 head 0 is a sink, layer 1 head 0 attends to its own frame, so a
    summary that averaged head 0 over the layers would print 0.5. A bidirectional store of 16 steps lists them as
    a range; no value prints as -0.000."""
    causal = synthetic.write_store(tmp_path / "c.zarr", "causal", layers=(0, 1), num_heads=4)
    from workbench.store import open_store
    from workbench.summary import summary_table

    text = summary_table(causal)
    rows = {tuple(int(v) for v in line.split()[:2]): [float(v) for v in line.split()[2:]]
            for line in text.splitlines() if line.split()[:1] and line.split()[0].isdigit()}
    assert sorted(rows) == [(layer, head) for layer in (0, 1) for head in range(4)]
    np.testing.assert_allclose(rows[(0, 0)][:4], [1.0, 0.0, 0.0, 0.0], atol=1e-3)  # sink: all on frame 0
    np.testing.assert_allclose(rows[(1, 0)][:3], [0.0, 1.0, 0.0], atol=1e-3)  # local: all on its own chunk
    # same frame and mean distance against a float64 computation over the counted query frames (after chunk 0)
    ds = open_store(causal)
    m = ds.attn_mass.where(ds.phase == "denoise", drop=True).values.astype(np.float64)  # [sample, step, L, H, q, k]
    q = ds.query_frame.values
    counted = ds.query_chunk.values > 0
    m = np.nan_to_num(m[..., counted, :])
    dist = np.abs(q[counted][:, None] - ds.key_frame.values[None, :])
    for (layer, head), got in rows.items():
        mh = m[:, :, (0, 1).index(layer), head]  # [sample, step, q, k]
        same = np.stack([mh[..., i, f] for i, f in enumerate(q[counted])], -1)
        want_dist = (mh * dist).sum(-1) / mh.sum(-1)
        np.testing.assert_allclose(got[3:], [same.mean(), want_dist.mean()], atol=6e-3)
    assert "reading: most local layer 0 head 1 (1.00 of its attention on its own frame)" in text
    assert text.rstrip().endswith("(its head table reads the last chunk's query frames at one step: sink_mass is "
                                  "frame 0's share there, mean_abs_distance the mean |q-k|)")  # (other numbers: why)
    attended = ~np.isnan(ds.attn_mass.where(ds.phase == "denoise", drop=True).values[..., counted, :])
    uniform = (1.0 / attended.sum(-1)).mean()  # frame 0's share if each counted row spread its mass evenly
    assert f"most drawn to frame 0: layer 0 head 0 (1.00; uniform attention would give it {uniform:.2f})" in text
    from workbench.summary import reading

    below = np.array([[0.01, 0.05]])  # no head above uniform attention's share: none is called drawn to frame 0
    assert reading([3], [0, 1], below, below, below, uniform=0.09).endswith(
        "no head is drawn to frame 0: each gives it no more than uniform attention would (0.09; the most, layer 3 "
        "head 1, 0.05)")
    near = np.array([[0.1302, 0.05]])  # a hair above uniform: more digits, not "0.13; ... would give it 0.13"
    assert reading([3], [0, 1], near, below, below, uniform=0.1298).endswith(
        "most drawn to frame 0: layer 3 head 0 (0.1302; uniform attention would give it 0.1298)")
    assert reading([3], [0, 1], below + 1, below, below, uniform=1.0).endswith(  # one key frame: 1.00 is everyone's
        "frame 0 is the only key frame the rows attend, so no head can be told drawn to it")
    one = summary_table(synthetic.write_store(tmp_path / "one.zarr", "bidirectional", layers=(0,), num_heads=4))
    header = next(line for line in one.splitlines() if line.split()[:2] == ["layer", "head"])
    assert "rest" not in header and "other frames" in header  # one chunk: every frame but 0 is "other"
    assert len(next(line for line in one.splitlines() if line.split()[:2] == ["0", "0"]).split()) == 6
    rows = [line.split() for line in one.splitlines() if line.split()[:1] == ["0"]]
    assert len(rows) == 4 and all(abs(float(r[2]) + float(r[3]) - 1) < 2e-3 for r in rows)  # frame 0 + other = 1
    distance = [float(r[5]) for r in rows]  # the widest head is the one of the largest mean |q-k|
    assert f"widest layer 0 head {int(np.argmax(distance))} (keys {max(distance):.1f} frames away" in one
    assert ("denoising steps 0,2,4,6,8,10,12,14, CFG branch cond (the prompt's); all query frames, the video being "
            "one chunk") in one
    # the steps counted, named: a store of some steps (--steps 0,4) said "denoising steps" over step 0 alone
    causal = open_store(tmp_path / "c.zarr")
    assert "(mean over samples; denoising steps 0-3; query frames" in text
    causal.isel(step=[0, 4]).to_zarr(tmp_path / "c04.zarr", consolidated=False)
    assert "(mean over samples; denoising step 0; query frames" in summary_table(tmp_path / "c04.zarr")
    from workbench.store import open_store
    from workbench.summary import counted

    cfg = open_store(tmp_path / "one.zarr").attn_mass
    assert set(counted(cfg).cfg.values.tolist()) == {"cond"} and (cfg.cfg == "uncond").any()  # (uncond left out)
    uncond = open_store(tmp_path / "one.zarr")  # a store of uncond steps alone (extract --steps 1,3): those
    uncond.isel(step=(uncond.cfg == "uncond").values).to_zarr(tmp_path / "unc.zarr", consolidated=False)
    alone = summary_table(tmp_path / "unc.zarr")
    assert "CFG branch uncond (the negative prompt's: the only one captured)" in alone and "nan" not in alone
    bidi = synthetic.write_store(tmp_path / "b.zarr", "bidirectional", layers=tuple(range(10)), num_heads=12)
    text += summary_table(bidi)
    assert "steps 0-15" in text and "layers 0-9" in text and "-0.000" not in text
    assert "a row per layer, a column per head" in text  # 120 heads: grids, not 120 rows


def test_temporaries_of_killed_writes_are_found_and_a_training_start_removes_them(tmp_path, capsys, monkeypatch):
    """A write killed midway leaves its hidden temporary file (a checkpoint's part: gigabytes for a large model).
    Stale means: the writing process is gone and the file has not changed for STALE_AFTER_S; a live writer's file,
    a recent one, and other hidden files stay. build_trainer removes the stale ones of its logdir and says so."""
    import subprocess
    import sys
    import time

    from models.files import STALE_AFTER_S, stale_temporaries, temporary_path

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ck = tmp_path / "log" / "checkpoint_model_000002"
    ck.mkdir(parents=True)
    old = time.time() - 2 * STALE_AFTER_S
    paths = {
        "killed": ck / f".model.pt.{gone.pid}-0123abcd.tmp.pt",
        "alive": temporary_path(ck / "training_state.pt"),  # this process's own name
        "recent": ck / f".losses.csv.{gone.pid}-89abcdef.tmp.csv",
        "other": ck / ".hidden.tmp",
    }
    for name, path in paths.items():
        path.write_bytes(b"part of a file")
        if name != "recent":
            os.utime(path, (old, old))
    assert stale_temporaries(tmp_path / "log") == [paths["killed"]]
    monkeypatch.chdir(REPO)  # (the config's data_path is relative to the repository)
    from training.build import build_trainer
    from training.config import load_config

    init = EMBEDDED_DIR / "checkpoints" / "ode_init.pt"
    cfg = load_config(REPO / "configs" / "tiny_dmd.yaml", overrides=[f"generator_ckpt={init}", "device=cpu"])
    build_trainer(cfg, tmp_path / "log", progress=False).close()
    assert f"removed {paths['killed']}" in capsys.readouterr().out
    assert not paths["killed"].exists() and all(paths[n].exists() for n in ("alive", "recent", "other"))


@pytest.mark.parametrize("command", ["extract", "intervene", "generate"])
def test_ctrl_c_is_one_line_that_says_what_is_kept(command, tmp_path, capsys, monkeypatch):
    """Ctrl-C during a run: exit status 130 and one line saying what was kept and how to go on, not a traceback."""
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module = importlib.import_module(f"workbench.commands.{command}")
    monkeypatch.setattr(module, "run", interrupted)
    from workbench.cli import main

    argv = {"intervene": ["--ablate", "1:0"]}.get(command, [])
    out = tmp_path / "o"
    assert main([command, *argv, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"workbench {command}: interrupted. Nothing was finished, so nothing is kept."
    synthetic.write_store(out, "causal", seeds=(1, 2))  # another run's output, there before this one
    assert main([command, *argv, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()  # (it was counted as this run's, finished and resumable)
    assert err == f"workbench {command}: interrupted. Nothing of this run was finished; {out} is as it was."


@pytest.mark.parametrize("command", ["extract", "intervene", "generate"])
def test_an_interrupted_run_counts_its_own_finished_work(command, tmp_path, capsys, monkeypatch):
    """Stopped after two finished samples (entries): the line counts this run's, says the same command resumes;
    with --overwrite, that the same command starts over and without it resumes, and before its first entry that the
    store is as it was (the old one goes when the first new entry is swapped in). It counted whatever the folder
    held (another run's files, the store being replaced) and promised a resume that --overwrite never made."""
    import models.common.rollout as rollout_module
    from workbench.cli import main
    from workbench.store import StoreWriter

    sample, write = rollout_module.sample, StoreWriter.write

    def stop_after(n):
        calls = {"n": 0}
        if command == "generate":  # each sample's latents are written after its rollout: stop the third rollout
            def stopping(*a, **kw):
                calls["n"] += 1
                if calls["n"] > n:
                    raise KeyboardInterrupt
                return sample(*a, **kw)

            monkeypatch.setattr(rollout_module, "sample", stopping)
        else:
            def stopping(self, *a, **kw):
                calls["n"] += 1
                if calls["n"] > n:
                    raise KeyboardInterrupt
                return write(self, *a, **kw)

            monkeypatch.setattr(StoreWriter, "write", stopping)

    out = tmp_path / "o"
    argv = {"intervene": ["--ablate", "1:0", "--ablate", "2:0", "--seeds", "0", "--world", "off"],
            "extract": ["--layer", "1", "--stats", "attn_mass", "--seed", "0-2"],
            "generate": ["--seed", "0-2", "--no-video"]}[command]
    run = [command, *argv, "--frames", "3", "--out", str(out), "--no-progress"]
    what = {"extract": "sample(s)", "intervene": "entry(ies) (baseline included)"}.get(command)
    stop_after(2)
    assert main(run) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if command == "generate":
        assert err == (f"workbench generate: interrupted. {out} holds 2 of this run's 3 sample(s), finished: the "
                       "same command, run again, makes only the others.")
    else:
        assert err == (f"workbench {command}: interrupted. {out} holds 2 finished {what}: the same command, run "
                       "again, resumes there.")
        # the store says what its run asked for, and the report that a part is missing
        import zarr

        from studies import unfinished_note

        attrs = dict(zarr.open_group(str(out), mode="r").attrs)
        asked = (["p0000-s0", "p0000-s1", "p0000-s2"] if command == "extract" else
                 ["baseline", "ablate-zero:L1.H0", "ablate-zero:L2.H0"])
        assert attrs["requested"] == asked and attrs["completed"] == asked[:2]
        noun = "samples" if command == "extract" else "entries"
        assert unfinished_note(attrs) == (f"This store holds 2 of the 3 {noun} its runs asked for (not there: "
                                          f"{asked[2]}): a run was stopped midway, or is still writing; the "
                                          "command that asked for them, run again, finishes it (each run's command "
                                          "is in the store's attrs `command` and `runs`). A store kept as it is "
                                          "needs nothing: its finished entries are whole.")
        assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
        assert f"note: {unfinished_note(attrs)}" in capsys.readouterr().out
        assert "<b>Unfinished:</b> This store holds 2 of the 3" in (tmp_path / "r.html").read_text()
    stop_after(1 if command == "generate" else 0)  # --overwrite: every sample again
    assert main(run + ["--overwrite"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if command == "generate":
        assert err == (f"workbench generate: interrupted. {out} holds 1 of this run's 3 sample(s), finished: the "
                       "same command without --overwrite makes only the others (with it, all of them again).")
        return
    assert err == (f"workbench {command}: interrupted. Nothing of this run was finished; {out} is as it was "
                   "(--overwrite replaces it once this run's first entry is done).")
    stop_after(1)
    assert main(run + ["--overwrite"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"workbench {command}: interrupted. {out} holds this run's 1 finished {what}: the same command "
                   "without --overwrite resumes there (with it, it starts over).")


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, timeout, a batch system's walltime) printed nothing after a half-drawn bar and left the run's
    temporary files; now it stops the command where it is, as Ctrl-C: one line, exit status 143, the handler put
    back afterwards."""
    import os
    import signal
    import time

    import workbench.commands.generate as generate
    from workbench.cli import main

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(generate, "run", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["generate", "--out", str(tmp_path / "g")]) == 143
    err = capsys.readouterr().err.strip()
    assert err == "workbench generate: terminated (SIGTERM). Nothing was finished, so nothing is kept."
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_write_the_disk_refuses_is_the_oserror_that_stopped_it(tmp_path):
    """A write the kernel refuses part way (here a file size limit, as a full disk): torch.save's zip writer reports
    it as a RuntimeError ("unexpected pos ..."), and ffmpeg's unfinished mp4 raised nothing through imageio.
    atomic_torch_save gives the OSError behind it and write_mp4 finds the mp4 without its index, each naming the
    file (the CLI's one line) and leaving neither the file nor a temporary one. In a child process with
    RLIMIT_FSIZE set and SIGXFSZ ignored."""
    import subprocess
    import sys

    from models.video import mp4_available

    child = tmp_path / "child.py"
    child.write_text(
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "import numpy as np, torch\n"
        "from models.files import atomic_torch_save\n"
        "from models.video import write_mp4, mp4_available\n"
        "out = sys.argv[1]\n"
        "try:\n"
        "    atomic_torch_save({'x': torch.zeros(100_000)}, out + '/big.pt')\n"
        "except OSError as e:\n"
        "    print('pt', e.errno, e.filename)\n"
        "atomic_torch_save({'x': torch.zeros(1000)}, out + '/small.pt')\n"
        "if mp4_available():\n"
        "    noise = np.random.default_rng(0).uniform(-1, 1, (3, 33, 256, 256)).astype('float32')\n"
        "    try:\n"
        "        write_mp4(noise, out + '/v.mp4')\n"
        "    except OSError as e:\n"
        "        print('mp4', e.errno, e.filename)\n")
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run([sys.executable, str(child), str(out)], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == f"pt 27 {out / 'big.pt'}"  # EFBIG, the file named
    if mp4_available():
        assert lines[1] == f"mp4 5 {out / 'v.mp4'}"  # EIO: "ffmpeg could not finish the mp4 (no index at its end)"
    assert [p.name for p in out.iterdir()] == ["small.pt"]  # no partial file, no temporary one
    assert torch.load(out / "small.pt")["x"].shape == (1000,)


def test_torch_files_are_the_same_bytes_for_the_same_values(tmp_path):
    """atomic_torch_save writes through a Python file, so torch names the archive's records archive/... instead of
    after each save's temporary file: the same values give byte-identical files (checkpoints, legacy files)."""
    from models.files import atomic_torch_save

    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 3}
    atomic_torch_save(state, tmp_path / "a.pt")
    atomic_torch_save(state, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_an_interrupted_command_leaves_no_progress_bar_to_be_drawn_again(monkeypatch, capsys):
    """Ctrl-C in a command with a progress bar open: the bar is closed before the message, so the message is the
    last line (tqdm drew the open bar again under it when the process exited)."""
    from tqdm import tqdm

    import workbench.commands.info as info
    from workbench.cli import main as cli_main

    def interrupted(args):
        bar = tqdm(total=10, desc="work")
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert cli_main(["info"]) == 130
    assert not list(tqdm._instances)
    assert capsys.readouterr().err.rstrip().splitlines()[-1] == "workbench info: interrupted."


PLUGIN = '''"""A user's statistic, registered from outside the workbench: twice the self-attention mass."""
from workbench import statistics as S

S.register(S.Statistic("test_plugin_mass2", S.FRAME_PAIR, "self", needs_lse=True,
                       reduce=lambda t: 2 * S.get("attn_mass").reduce(t), long_name="twice the mass",
                       units="probability", description="2 x attn_mass", help="twice attn_mass"))
'''


def test_the_recorded_command_names_the_plugins_as_they_load(tmp_path, monkeypatch, capsys):
    """The command a store records starts with WORKBENCH_PLUGINS as a shell takes it: the module names without the
    spaces and empty items of the variable, in the order given (the order they load in: a later one's
    `register(..., replace=True)` wins), none added or dropped; none: no assignment."""
    import sys

    from workbench.commands import info

    for name in ("qa_first_plugin", "qa_second_plugin"):
        (tmp_path / f"{name}.py").write_text("")
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    monkeypatch.setattr(info, "run", lambda args: seen.append(args.argv) or 0)
    for value, first in ((" qa_second_plugin , ,qa_first_plugin,qa_second_plugin,",
                          "WORKBENCH_PLUGINS=qa_second_plugin,qa_first_plugin,qa_second_plugin"),
                         (" , ", "workbench")):
        monkeypatch.setenv("WORKBENCH_PLUGINS", value)
        assert cli_main(["info"]) == 0 and "warning" not in capsys.readouterr().err  # (each one loaded)
        assert seen[-1][:2] == ([first, "workbench"] if first != "workbench" else ["workbench", "info"]), seen[-1]


def test_workbench_plugins_register_statistics_the_command_line_takes(tmp_path, monkeypatch, capsys):
    """WORKBENCH_PLUGINS names modules imported before the command line is read: a statistic they register is a
    --stats choice of extract (it was 'unknown statistic'), stored with its own attributes."""
    import sys

    from workbench import statistics
    from workbench.store import open_store

    (tmp_path / "my_plugin_stat.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WORKBENCH_PLUGINS", "my_plugin_stat")
    out = tmp_path / "p.zarr"
    try:
        assert cli_main(["extract", "--layer", "0", "--frames", "6", "--steps", "0", "--stats",
                         "attn_mass,test_plugin_mass2", "--out", str(out), "--no-progress"]) == 0
    finally:  # (the registry is the process's: leave it as the other tests know it)
        statistics.STATISTICS.pop("test_plugin_mass2", None)
        sys.modules.pop("my_plugin_stat", None)
    ds = open_store(out)
    assert np.isnan(ds.attn_mass).any()  # (the future chunks' cells: the NaN pattern is compared too)
    np.testing.assert_allclose(ds.test_plugin_mass2, 2 * ds.attn_mass, rtol=1e-6)
    assert ds.test_plugin_mass2.attrs["long_name"] == "twice the mass"
    # a plugin that is missing or raises is left out with a warning, and the commands go on without it (one
    # broken plugin stopped every command, `report` and `--help` included)
    (tmp_path / "my_dup_stat.py").write_text(  # (a statistic of its own, then a name already taken)
        'import dataclasses\nfrom workbench import statistics as S\n'
        'S.register(dataclasses.replace(S.get("attn_mass"), name="test_half_registered"))\n'
        'S.register(S.get("attn_mass"))\n')
    monkeypatch.setenv("WORKBENCH_PLUGINS", "no_such_module_here,my_dup_stat")
    capsys.readouterr()
    assert cli_main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    err = capsys.readouterr().err
    assert "workbench: warning: WORKBENCH_PLUGINS: no module 'no_such_module_here' (give module names importable" in err
    assert ("workbench: warning: WORKBENCH_PLUGINS: module 'my_dup_stat' raised ValueError while importing, so it "
            "is left out (what it registered before that is taken back): statistic 'attn_mass' is registered "
            "already") in err
    assert "test_half_registered" not in statistics.STATISTICS  # (taken back: half a plugin is no plugin)
    assert cli_main(["extract", "--stats", "attn_mass,test_plugin_mass2", "--out", str(tmp_path / "q.zarr")]) == 2
    assert "unknown statistic(s) ['test_plugin_mass2']" in capsys.readouterr().err
    assert not (tmp_path / "q.zarr").exists()


def test_a_statistic_of_ones_own_is_checked_and_its_store_refuses_it_changed(tmp_path, capsys):
    """A plugin's statistic is checked where it is registered (a name, dims the probe can place, the texts that
    define its store variable), its name against the store's coordinates before any work, and its reduce's
    result shape at its first call (a wrong one was broadcast into the cells). A store made with it records its
    definition and code: the statistic changed (a notebook cell run again) is refused by name, not mixed in with
    the old one's samples (it resumed silently)."""
    import dataclasses

    import torch

    from workbench import statistics as S
    from workbench.statistics import identity as statistics_identity
    from workbench.store import open_store

    mass = S.get("attn_mass")
    own = dataclasses.replace(mass, name="test_own_mass", reduce=lambda t: 2 * mass.reduce(t), from_kernel=(),
                              default=False, description="2 x attn_mass")
    for bad, match in ((dict(name="my stat"), "use a Python identifier"),
                       (dict(dims=S.FRAME_PAIR[:4]), r"dims \('sample', 'step', 'layer', 'head'\); a self-attention "
                        r"statistic has \(sample, step, layer or token_layer, head, query_frame\) and optionally a "
                        "key dim, key_frame or key_token"),
                       (dict(dims=(*S.FRAME_PAIR[:5], "my_dim")), "dims"), (dict(kind="cross"), "text_token"),
                       (dict(dims=(*S.FRAME_PAIR, "key_frame")), "dims"), (dict(dims=("sample", "step", "block",
                        *S.FRAME_PAIR[3:])), "dims"), (dict(help=""), "give help"),
                       (dict(description=" "), "give description"), (dict(name="attn_mass"), "registered already")):
        with pytest.raises(ValueError, match=match):
            S.register(dataclasses.replace(own, **bad))
    out = tmp_path / "own.zarr"
    run = ["extract", "--layer", "0", "--frames", "6", "--steps", "0", "--stats", "attn_mass,{}", "--out", str(out),
           "--no-progress"]
    try:
        S.register(dataclasses.replace(own, name="timestep"))
        assert cli_main([w.format("timestep") for w in run]) == 2
        assert "statistic(s) ['timestep'] share a name with a store coordinate" in capsys.readouterr().err
        S.register(dataclasses.replace(own, name="test_own_flat", reduce=lambda t: torch.zeros(3)))
        assert cli_main([w.format("test_own_flat") for w in run]) == 2
        assert ("statistic 'test_own_flat': its reduce returned Tensor of shape (3,) for layer 0's self-attention "
                "call; its dims ('sample', 'step', 'layer', 'head', 'query_frame', 'key_frame') want [B, heads, "
                "query frames(, keys)] = [1, 4, 3, 3]") in capsys.readouterr().err
        assert not out.exists()
        def raises(t):
            raise ValueError("my bug")

        S.register(dataclasses.replace(own, name="test_own_raises", reduce=raises))
        assert cli_main([w.format("test_own_raises") for w in run]) == 2
        assert ("statistic 'test_own_raises' (a plugin's): its reduce raised ValueError: my bug (layer 0's "
                "self-attention call, step 0, chunk 0); what the run finished before is kept") in \
            capsys.readouterr().err
        S.register(own)
        assert cli_main([w.format("test_own_mass") for w in run]) == 0
        stored = open_store(out).attrs["fingerprint_fields"]["model"]["own_stats"]["test_own_mass"]
        assert stored["description"] == "2 x attn_mass" and "<lambda> (code " in stored["code"]
        S.STATISTICS["test_own_mass"] = dataclasses.replace(own, reduce=lambda t: 3 * mass.reduce(t))  # (edited)
        assert cli_main([w.format("test_own_mass") for w in run] + ["--seeds", "42,43"]) == 2
        err = capsys.readouterr().err  # (the two codes' hashes shown: the end of a long value is kept)
        codes = [open_store(out).attrs["fingerprint_fields"]["model"]["own_stats"]["test_own_mass"]["code"],
                 statistics_identity("test_own_mass")["code"]]
        assert codes[0] != codes[1] and all(c[-26:] in err for c in codes)
        assert "model.own_stats.test_own_mass.code: test_a_statistic_of_ones_own_is_checke..." in err
        assert cli_main(["extract", "--layer", "0", "--frames", "6", "--steps", "0", "--out", str(out),
                         "--no-progress"]) == 2  # (without the plugin's statistic: its section named once)
        err = capsys.readouterr().err
        assert "model.own_stats: test_own_mass in the store, (not set) in this run" in err
        assert "load the plugin code that made the store, WORKBENCH_PLUGINS, and give the same --stats" in err
        S.STATISTICS["test_own_mass"] = own  # (the same code again: it resumes)
        assert cli_main([w.format("test_own_mass") for w in run] + ["--seeds", "42,43"]) == 0

        def own_frame(t):  # the mass on the query's own frame: the call's frame labels say which key frame that is
            m = mass.reduce(t)  # [B, h, nqf, nkf]
            return m[:, :, range(len(t.query_frames)), [t.key_frames.index(f) for f in t.query_frames]]

        S.register(dataclasses.replace(own, name="test_own_frame", dims=S.FRAME_PAIR[:5], reduce=own_frame))
        assert cli_main([w.format("test_own_frame") for w in run[:-3]] + ["--out", str(tmp_path / "f.zarr")]) == 0
        ds = open_store(tmp_path / "f.zarr")
        np.testing.assert_array_equal(ds.test_own_frame, np.diagonal(ds.attn_mass.values, axis1=-2, axis2=-1))
        # on --token-layers only (a token_layer dim without key_token): labelled by the layers it was captured on
        S.register(dataclasses.replace(own, name="test_own_tl", dims=("sample", "step", "token_layer", "head",
                                                                      "query_frame"), reduce=own_frame))
        tl = ["extract", "--layers", "0,1", "--token-layers", "1", "--frames", "6", "--steps", "0", "--stats",
              "attn_mass,test_own_tl", "--out", str(tmp_path / "tl.zarr"), "--no-progress"]
        assert cli_main(tl) == 0
        ds = open_store(tmp_path / "tl.zarr")
        assert ds.token_layer.values.tolist() == [1]
        np.testing.assert_array_equal(ds.test_own_tl.isel(token_layer=0),
                                      np.diagonal(ds.attn_mass.sel(layer=1).values, axis1=-2, axis2=-1))
    finally:  # (the registry is the process's: leave it as the other tests know it)
        for name in ("timestep", "test_own_flat", "test_own_mass", "test_own_frame", "test_own_tl", "test_own_raises"):
            S.STATISTICS.pop(name, None)
    assert open_store(out).sizes["sample"] == 2


def test_a_plugin_statistics_identity_holds_the_values_its_code_reads(tmp_path, capsys, monkeypatch):
    """The identity a store keeps of a plugin's statistic covers what its reduce reads besides its code: a
    closure's values, a functools.partial's arguments (its reduce crashed the identity), a callable object's
    settings and constant globals; a store made before identities were recorded takes the statistic with a note."""
    import dataclasses
    import functools

    from workbench import statistics as S
    from workbench.code_identity import callable_identity

    def make(scale):
        return lambda t: scale * t

    def scaled(t, scale):
        return scale * t

    class Scale:
        def __init__(self, scale):
            self.scale = scale

        def __call__(self, t):
            return self.scale * t

    same = callable_identity(make(0.1)) == callable_identity(make(0.1))
    assert same and callable_identity(make(0.1)) != callable_identity(make(0.5))
    two, three = (callable_identity(functools.partial(scaled, scale=x)) for x in (2, 3))
    assert two != three
    assert callable_identity(Scale(2)) != callable_identity(Scale(3)) and "Scale (code " in callable_identity(Scale(2))
    mass = S.get("attn_mass")
    own = dataclasses.replace(mass, name="test_own_partial", from_kernel=(), default=False,
                              reduce=functools.partial(lambda t, f: f * mass.reduce(t), f=2))
    out = tmp_path / "old.zarr"
    run = ["extract", "--layer", "0", "--frames", "6", "--steps", "0", "--stats", "attn_mass,test_own_partial",
           "--out", str(out), "--no-progress"]
    try:
        S.register(own)
        with monkeypatch.context() as m:  # (a store made before the identities were recorded)
            m.setattr(S, "identity", lambda name: None)
            assert cli_main(run) == 0
        capsys.readouterr()
        assert cli_main(run[:-3] + ["--seeds", "42,43", "--out", str(out), "--no-progress"]) == 0
    finally:
        S.STATISTICS.pop("test_own_partial", None)
    assert ("did not record the definition and code of its own (plugins') statistics; every setting it recorded "
            "agrees") in capsys.readouterr().out


def test_a_broken_entry_point_plugin_is_left_out_with_a_warning(tmp_path, monkeypatch, capsys):
    """A `workbench.plugins` entry point of an installed package (here a dist-info folder on the path) is loaded
    before the command line; one that raises is named in a warning and the command goes on;
    WORKBENCH_NO_ENTRY_POINTS=1 skips them."""
    from workbench.cli import load_plugins

    (tmp_path / "qa_broken_plugin.py").write_text(  # (it registers a statistic, then raises: taken back)
        'import dataclasses\nfrom workbench import statistics as S\n'
        'S.register(dataclasses.replace(S.get("attn_mass"), name="qa_half_registered"))\n'
        'raise RuntimeError("boom on import")\n')
    info = tmp_path / "qa_broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qa-broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[workbench.plugins]\nbroken = qa_broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("WORKBENCH_PLUGINS", raising=False)
    said = []
    assert load_plugins(warn=said.append) == []
    assert said == ["workbench: warning: the workbench.plugins entry point 'broken' (qa_broken_plugin) failed to load, "
                    "so it is left out: RuntimeError: boom on import (WORKBENCH_NO_ENTRY_POINTS=1 skips the entry "
                    "points)"]
    from workbench import statistics

    assert "qa_half_registered" not in statistics.STATISTICS
    monkeypatch.setenv("WORKBENCH_NO_ENTRY_POINTS", "1")
    said.clear()
    assert load_plugins(warn=said.append) == [] and not said


def test_progress_bars_redraw_rarely_into_a_log_file(monkeypatch):
    """Bars redrew ~10 times a second into a redirected stderr (1-2 MB of a batch job's log an hour); with no
    terminal (and no Jupyter) they redraw every LOG_INTERVAL seconds, on a terminal as tqdm does. In a log tqdm's
    monitor thread waits LOG_INTERVAL too (its default, 10 s, drew a line every 10 s of a slow bar)."""
    import io
    import sys

    from workbench import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    for stream, interval in ((io.StringIO(), progress.LOG_INTERVAL), (Terminal(), 0.1)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress.progress_bar(total=3, file=stream)
        assert bar.mininterval == interval and bar.maxinterval == (interval if interval > 1 else 10)
        bar.close()
    assert progress.progress_bar(total=3, disable=True).disable  # (--no-progress)
    log = io.StringIO()  # a log: each drawing a line of ASCII; a new postfix (a training loss) forces none
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress.progress_bar(total=40, desc="train")
    for step in range(40):
        bar.set_postfix(loss=f"{1 / (step + 1):.4g}")
        bar.set_postfix_str("a video")
        bar.update(1)
    bar.close()
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and all(line.isascii() for line in lines) and lines[-1] == ""
    assert 1 <= len(lines) - 1 <= 3 and lines[-2].startswith("train: 100%"), lines


@pytest.mark.parametrize("argv, flag", [
    (["extract", "--layer", "3", "--prompt", "a red caf\udce9 moving right"], "--prompt"),
    (["generate", "--prompt", "a red caf\udce9", "--frames", "3"], "--prompt"),
    (["extract", "--layer", "3", "--out", "runs/caf\udce9.zarr"], "--out"),
    (["generate", "--seed", "caf\udce9"], "--seeds"),  # (a flag of two names: named by the longer)
])
def test_an_argument_that_is_not_utf8_is_one_line_before_any_work(argv, flag, capsys, no_work):
    """A latin-1 terminal or script sends 'é' as the byte 0xe9, which Python keeps as a lone surrogate: every
    store, JSON and YAML writer refused it with a traceback (exit status 1), after the model work."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"workbench {argv[0]}: error: {flag} ") and err.count("\n") == 1
    assert "caf\\xe9" in err and "is not UTF-8 text" in err


def test_an_undecodable_value_is_named_by_its_long_flag_or_metavar():
    """A value's flag in the message is its long form (`--out`, not `-o`); a positional's is its metavar."""
    import argparse

    from workbench.cli import _undecodable_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("-o", "--out")
    parser.add_argument("store", metavar="STORE")
    said = _undecodable_arguments(argparse.Namespace(out="caf\udce9", store="s"), parser)
    assert said.startswith("--out 'caf\\xe9' is not UTF-8 text"), said
    said = _undecodable_arguments(argparse.Namespace(out="o", store="caf\udce9"), parser)
    assert said.startswith("STORE 'caf\\xe9' is not UTF-8 text"), said
    assert _undecodable_arguments(argparse.Namespace(out="o", store="caf\u00e9"), parser) is None


@pytest.mark.parametrize("command", ["generate", "extract"])
def test_a_checkpoint_that_would_run_code_is_refused_before_any_work(command, tmp_path, capsys, no_work, monkeypatch):
    """A .pt whose unpickling calls a function (os.system) was refused only when the DiT loaded, after the text
    encoder had run; its safe unpickling (tensors memory-mapped, not read) now comes with the other checks."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"generator": Evil()}, tmp_path / "evil.pt")
    encoded = []
    import models.wan.text_encoder as te

    monkeypatch.setattr(te.TextEncoder, "from_wan_dir", classmethod(lambda *a, **kw: encoded.append(1)))
    argv = [command, "--checkpoint", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")]
    assert cli_main(argv + (["--layer", "3"] if command == "extract" else [])) == 2
    err = capsys.readouterr().err
    assert "needs arbitrary unpickling, which can run code (Trying to load unsupported GLOBAL posix.system" in err
    assert not encoded and err.count("\n") == 1
    from workbench.weights import check_weights_args

    torch.save({"generator": Evil()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(Exception, match="legacy.pt' needs arbitrary unpickling"):  # (the old format: read whole)
        check_weights_args(str(tmp_path / "legacy.pt"), False)
    import models.files

    class WorkStarted(Exception):
        pass

    def work_started(*a, **kw):
        raise WorkStarted

    # --trust-pickle: the command goes on, unchecked, to its first step of work (generate: the text encoder;
    # extract: the weights' hash for the store), where the test stops it
    checked = []
    monkeypatch.setattr(models.files, "check_unpickling", lambda path: checked.append(path))
    monkeypatch.setattr(te.TextEncoder, "from_wan_dir", classmethod(work_started))
    monkeypatch.setattr(extract_mod, "weights_sha256", work_started)
    with pytest.raises(WorkStarted):
        cli_main(argv + ["--trust-pickle"] + (["--layer", "3"] if command == "extract" else []))
    err = capsys.readouterr().err
    assert checked == [] and "error:" not in err and "needs arbitrary unpickling" not in err, err


def test_the_cli_keeps_idle_cpu_threads_from_spinning(monkeypatch):
    """`workbench` sets OMP_WAIT_POLICY=PASSIVE before torch is imported, unless the environment sets it; after torch
    is imported (a notebook calling main) it leaves the environment alone (too late for OpenMP to read it)."""
    import os
    import subprocess
    import sys

    from workbench import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli.passive_cpu_threads()
    assert "OMP_WAIT_POLICY" not in os.environ  # (torch is imported in this process)
    script = ("import os, sys\nfrom workbench.cli import main\nassert main(['--version']) == 0\n"
              "assert 'torch' not in sys.modules\nprint(os.environ.get('OMP_WAIT_POLICY'))\n")
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env |= {"OMP_WAIT_POLICY": given} if given else {}
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.split()[-1] == want, (given, r.stdout, r.stderr[-2000:])


def test_a_commands_unknown_flag_gets_the_commands_usage(capsys):
    """argparse refused it with the top-level usage ("usage: workbench [-h] [--version] COMMAND ..."), which names
    none of the command's flags."""
    assert cli_main(["generate", "--seeed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: workbench generate ") and "--seed SEED" in err
    assert err.rstrip().endswith("workbench generate: error: unrecognized arguments: --seeed 1"), err
    assert cli_main(["--bogus"]) == 2 and "usage: workbench [-h]" in capsys.readouterr().err


def test_python_dash_m_workbench_is_the_workbench_command():
    """`python -m workbench` (a habit, and what works without the script on PATH) runs the same CLI, named so."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "workbench", "extract", "--seeed", "1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("usage: workbench extract "), r.stderr[-2000:]


def test_intervene_offers_only_the_models_it_runs(capsys):
    assert cli_main(["intervene", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "ode (ODE init), dmd (Self-Forcing DMD, the default), sid (Self-Forcing SiD)" in text
    assert "teacher (the bidirectional" not in text and "so not teacher or df" in text

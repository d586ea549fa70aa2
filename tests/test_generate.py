"""`workbench generate` end to end on the embedded default: latents, an mp4 with 1 + 4 (F - 1) frames at the
VAE's size, and a PNG grid; clear errors before any work."""

import shutil

import imageio.v3 as iio
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.video import mp4_available
from workbench.cli import main


def test_a_batch_of_samples_draws_one_bar_into_a_log(tmp_path, capsys, monkeypatch):
    """Into a log (no terminal), the samples of a run share one bar, named by the sample it is on: a bar each
    wrote two lines per sample (2000 lines for a 1000-prompt job). It counts every DiT forward of the run: 2
    samples of one chunk of 4 steps, the last context pass skipped."""
    monkeypatch.delitem(__import__("sys").modules, "ipykernel", raising=False)
    assert main(["generate", "--prompt", "a red kite", "--frames", "3", "--seed", "0,1", "--height", "32",
                 "--width", "32", "--out", str(tmp_path / "g"), "--no-video"]) == 0
    bars = [line for line in capsys.readouterr().err.splitlines() if "%|" in line and not line.startswith("encode")]
    assert 2 <= len(bars) <= 3 and all(line.startswith("generate: ") for line in bars), bars
    assert bars[-1].startswith("generate: 100%") and "| 8/8 " in bars[-1] and bars[-1].endswith(", p0000-s1]"), bars


def test_generate_writes_latents_video_and_grid(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a red kite over the sea", "--frames", "6", "--seed", "3",
                 "--out", str(out), "--no-progress"]) == 0
    summary = capsys.readouterr().out  # what was written and how the files are named
    assert f"wrote 1 sample(s) to {out}: latents (.safetensors)" in summary and "(e.g. p0000-s3)" in summary
    latents = load_file(str(out / "p0000-s3.safetensors"))["latents"]
    assert latents.shape == (6, 16, 12, 16) and torch.isfinite(latents).all()
    if mp4_available():
        frames = iio.imread(out / "p0000-s3.mp4")
        assert frames.shape == (1 + 4 * (6 - 1), 96, 128, 3)
        # an mp4 cut short (ffmpeg's index never written: a full disk at its end) is made again by a resumed run
        whole = (out / "p0000-s3.mp4").read_bytes()
        (out / "p0000-s3.mp4").write_bytes(whole[: len(whole) // 2])
        capsys.readouterr()
        assert main(["generate", "--prompt", "a red kite over the sea", "--frames", "6", "--seed", "3",
                     "--out", str(out), "--no-progress"]) == 0
        assert "resuming" not in capsys.readouterr().out and (out / "p0000-s3.mp4").read_bytes() == whole
    else:  # an install without the video extra: the grid and latents, and a note saying how to get mp4
        assert not (out / "p0000-s3.mp4").exists() and "pip install -e '.[video]'" in capsys.readouterr().err
    assert (out / "p0000-s3.png").stat().st_size > 0
    # the same seed gives the same latents
    assert main(["generate", "--prompt", "a red kite over the sea", "--frames", "6", "--seed", "3",
                 "--out", str(tmp_path / "again"), "--no-progress", "--no-video"]) == 0
    assert torch.equal(load_file(str(tmp_path / "again" / "p0000-s3.safetensors"))["latents"], latents)


def test_generate_errors_before_work(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["generate", "--prompts", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty.txt" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "--prompt", "x", "--out", str(blocker / "sub")]) == 2
    assert "file" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--frames", "8", "--out", str(tmp_path / "o2")]) == 2
    assert "chunks of 3" in capsys.readouterr().err


def test_generate_with_the_fast_vae_decoder(tmp_path, capsys, monkeypatch):
    """--vae-decoder fast: the same latents (the decoder does not touch the rollout) and a grid within one grey
    level of the reference decoder's (the two differ by float32 rounding); a bad WORKBENCH_VAE_DECODER is refused
    before any work."""
    runs = {}
    for decoder in ("reference", "fast"):
        out = tmp_path / decoder
        assert main(["generate", "--prompt", "a red kite", "--frames", "6", "--seed", "1", "--out", str(out),
                     "--no-progress", "--vae-decoder", decoder]) == 0
        runs[decoder] = (load_file(str(out / "p0000-s1.safetensors"))["latents"], iio.imread(out / "p0000-s1.png"))
    (lat_r, png_r), (lat_f, png_f) = runs["reference"], runs["fast"]
    assert torch.equal(lat_r, lat_f)
    assert png_r.shape == png_f.shape and png_r.std() > 1
    assert abs(png_r.astype(int) - png_f.astype(int)).max() <= 1
    capsys.readouterr()
    monkeypatch.setenv("WORKBENCH_VAE_DECODER", "turbo")
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "bad")]) == 2
    assert "WORKBENCH_VAE_DECODER 'turbo'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_generate_skips_the_last_context_pass_and_keeps_its_outputs(tmp_path, monkeypatch):
    """Without --live, generate skips the last chunk's context pass (it only writes the KV cache): the latents
    and the decoded grid are bitwise those of a run that keeps it, with one DiT forward fewer."""
    import models.common.rollout as rollout

    real, calls = rollout.sample, []

    def counting(*args, force_last=None, **kwargs):
        calls.append(kwargs["last_context_pass"])
        if force_last is not None:
            kwargs["last_context_pass"] = force_last
        forwards = []
        on_forward = kwargs["on_forward"]
        kwargs["on_forward"] = lambda *a: (forwards.append(a), on_forward(*a))
        out = real(*args, **kwargs)
        calls.append(len(forwards))
        return out

    runs = {}
    for keep in (False, True):
        monkeypatch.setattr(rollout, "sample", lambda *a, keep=keep, **k: counting(*a, force_last=keep or None, **k))
        out = tmp_path / f"keep{keep}"
        assert main(["generate", "--prompt", "a red kite", "--frames", "6", "--seed", "2", "--out", str(out),
                     "--no-progress"]) == 0
        runs[keep] = (load_file(str(out / "p0000-s2.safetensors"))["latents"], iio.imread(out / "p0000-s2.png"))
    assert calls == [False, 2 * 5 - 1, False, 2 * 5]  # generate asked to skip; 2 chunks x (4 steps + context)
    assert torch.equal(runs[False][0], runs[True][0])
    assert (runs[False][1] == runs[True][1]).all() and runs[False][1].std() > 1


def test_generate_repeated_prompt_runs_every_prompt(tmp_path):
    """--prompt given twice runs both (as evaluate's and intervene's do), not only the last: prompt index P names
    the files, each file records its own prompt, and the second prompt's latents equal a run of it alone."""
    out, alone = tmp_path / "two", tmp_path / "alone"
    assert main(["generate", "--prompt", "a red square moving left", "--prompt", "a blue circle moving up",
                 "--frames", "3", "--seed", "1", "--out", str(out), "--no-progress", "--no-video"]) == 0
    assert main(["generate", "--prompt", "a blue circle moving up", "--frames", "3", "--seed", "1",
                 "--out", str(alone), "--no-progress", "--no-video"]) == 0
    for index, prompt in enumerate(["a red square moving left", "a blue circle moving up"]):
        with safe_open(str(out / f"p{index:04d}-s1.safetensors"), "pt") as f:
            assert f.metadata()["prompt"] == prompt
    second = load_file(str(out / "p0001-s1.safetensors"))["latents"]
    assert torch.equal(second, load_file(str(alone / "p0000-s1.safetensors"))["latents"])
    assert not torch.equal(second, load_file(str(out / "p0000-s1.safetensors"))["latents"])


def test_a_multi_step_runs_guidance_steps_shift_and_negative_prompt_are_its_own(tmp_path, capsys):
    """A guidance sweep into one folder resumed the first run's files as if they were each run's ("nothing to do"):
    the multi-step samplers' steps, guidance, shift and negative prompt are recorded (`guidance`) and compared; a
    few-step file made before the record resumes as before."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    out = tmp_path / "gen"
    run = ["generate", "--model", "teacher", "--frames", "3", "--num-inference-steps", "2", "--out", str(out),
           "--no-progress", "--no-video"]
    assert main(run + ["--guidance-scale", "3"]) == 0
    capsys.readouterr()
    for extra, said in ((["--guidance-scale", "7"], "guidance 3.0, shift 5.0, negative prompt '' there, 2 steps, "
                                                     "guidance 7.0"),
                        (["--guidance-scale", "3", "--num-inference-steps", "3"], "2 steps, guidance 3.0"),
                        (["--guidance-scale", "3", "--timestep-shift", "2"], "shift 2.0, negative prompt '' now"),
                        (["--guidance-scale", "3", "--negative-prompt", "blurry"], "negative prompt 'blurry' now")):
        assert main(run + extra) == 2, extra
        assert said in capsys.readouterr().err, extra
    assert main(run + ["--guidance-scale", "3"]) == 0 and "nothing to do" in capsys.readouterr().out
    causal = ["generate", "--model", "df", "--frames", "3", "--num-inference-steps", "2", "--out", str(tmp_path / "df"),
              "--no-progress", "--no-video"]  # (the causal multi-step sampler's chunks change its latents too)
    assert main(causal) == 0 and main(causal + ["--num-frame-per-block", "1"]) == 2
    assert "3 frames a chunk there" in capsys.readouterr().err
    few = tmp_path / "few"
    assert main(["generate", "--frames", "3", "--out", str(few), "--no-progress", "--no-video"]) == 0
    (path,) = few.glob("*.safetensors")
    with safe_open(str(path), "np") as f:
        meta, latents = f.metadata(), f.get_tensor("latents")
    assert meta.pop("guidance") == ""
    save_file({"latents": latents}, str(path), metadata=meta)  # (as a workbench before the record wrote it)
    capsys.readouterr()
    assert main(["generate", "--frames", "3", "--out", str(few), "--no-progress", "--no-video"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_another_runs_files_are_replaced_only_when_asked(tmp_path, capsys):
    """Files are named p<prompt index>-s<seed>: a second run into the same folder with another prompt (or size)
    would replace the first run's files under the same names. It is refused before any work, naming them, unless
    --overwrite; the same run again is no clash."""
    out = tmp_path / "gen"
    first = ["generate", "--prompt", "a red square moving left", "--frames", "3", "--seed", "0,1", "--out", str(out),
             "--no-progress", "--no-video"]
    assert main(first) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    capsys.readouterr()
    other = ["generate", "--prompt", "a blue circle moving up", "--frames", "3", "--seed", "1", "--out", str(out),
             "--no-progress", "--no-video"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert (f"{out} holds files of another run under this run's names: p0000-s1 (prompt: 'a red square moving "
            "left' there, 'a blue circle moving up' now)"
            in err and "pass --overwrite to replace them" in err)
    assert main(first[:4] + ["6"] + first[5:]) == 2  # the same prompt at another length
    assert "p0000-s0 (size: 3 latent frames of 12x16 there, 6 of 12x16 now)" in capsys.readouterr().err
    # settings in words (their records are JSON and 'SIZE+sinkN'), each difference its own clause
    assert main(first + ["--local-attn-size", "6", "--sink-size", "1"]) == 2
    assert ("p0000-s0 (window: global attention there, a 6-frame window, 1 sink frame(s) now)"
            in capsys.readouterr().err)
    assert main(first + ["--sampler", "causal_multi_step_cfg", "--num-inference-steps", "2"]) == 2
    assert ("(sampler: 'causal_few_step' there, 'causal_multi_step_cfg' now; schedule: [1000, 750, 500, 250] warped, "
            "shift 5.0, 3 frames a chunk, context noise 0.0 there, none (a multi-step sampler) now; guidance: none "
            "(the few-step sampler) there, 2 steps, guidance 5.0, shift 5.0, negative prompt '', 3 frames a chunk now)"
            in capsys.readouterr().err)
    assert main(first + ["--dtype", "bf16"]) == 2  # (recorded under torch's name)
    assert "p0000-s0 (dtype: 'float32' there, 'bfloat16' now)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before  # nothing touched
    assert main(first) == 0  # the same run again: its own files, kept (a stopped run resumes this way)
    said = capsys.readouterr().out
    assert "resuming: 2 sample(s) are already in" in said and "size; nothing to do (--overwrite" in said
    assert f"all 2 sample(s) were already in {out}" in said  # (it said "generating the other 0", "wrote 0")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before
    (out / "p0000-s1.safetensors").unlink()  # as if the run had been stopped before its second sample
    assert main(first) == 0
    assert f"wrote 1 sample(s) to {out} (1 more were there already)" in capsys.readouterr().out
    assert main(other + ["--overwrite"]) == 0
    with safe_open(str(out / "p0000-s1.safetensors"), "pt") as f:
        assert f.metadata()["prompt"] == "a blue circle moving up"


def test_files_another_run_wrote_while_this_one_took_the_folder_are_refused(tmp_path, capsys, monkeypatch):
    """The names are checked again once the folder's lock is held: a run that wrote the folder between this run's
    first look and its lock (it held the lock then) had its files replaced without a word."""
    from workbench.store import StoreLock

    out, other = tmp_path / "gen", tmp_path / "other"
    run = ["--frames", "3", "--seed", "0", "--no-progress", "--no-video"]
    assert main(["generate", "--prompt", "a blue circle moving up", *run, "--out", str(other)]) == 0
    real = StoreLock.acquire

    def acquire(self):  # (the other run finishes while this one reaches the lock)
        if self.path == out:
            shutil.copy(other / "p0000-s0.safetensors", out / "p0000-s0.safetensors")
        return real(self)

    monkeypatch.setattr(StoreLock, "acquire", acquire)
    capsys.readouterr()
    assert main(["generate", "--prompt", "a red square moving left", *run, "--out", str(out)]) == 2
    assert "holds files of another run under this run's names: p0000-s0 (prompt: 'a blue circle moving up' there" \
        in capsys.readouterr().err
    with safe_open(str(out / "p0000-s0.safetensors"), "pt") as f:
        assert f.metadata()["prompt"] == "a blue circle moving up"


def test_a_folder_another_generate_writes_is_refused(tmp_path, capsys):
    from workbench.store import StoreLock

    out = tmp_path / "gen"
    with StoreLock(out, what="a generate folder"):
        assert main(["generate", "--prompt", "a red kite", "--frames", "3", "--out", str(out), "--no-progress",
                     "--no-video"]) == 75
    err = capsys.readouterr().err
    assert f"{str(out)!r} is being written by this process itself (another call of this Python session" in err
    assert "a generate folder takes one writer at a time" in err


def test_generate_never_leaves_half_written_latents(tmp_path, monkeypatch, capsys):
    """A write that fails midway (a full disk) leaves no latents file under the sample's name and no temporary
    file beside it: the latents are written to a temporary path and renamed into place."""
    from pathlib import Path

    write_bytes = Path.write_bytes

    def full_disk(self, data):
        if "safetensors" not in self.name:
            return write_bytes(self, data)
        with open(self, "wb") as f:
            f.write(data[:100])  # part of a file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a red kite", "--frames", "3", "--seed", "1", "--out", str(out),
                 "--no-progress", "--no-video"]) != 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"free space where generate writes ({out})" in err
    assert out.is_dir() and sorted(p.name for p in out.iterdir() if not p.name.startswith(".prompt_cache")) == []


def test_a_prompt_outside_the_miniature_world_is_named_in_a_note(tmp_path, capsys):
    """The embedded models know one coloured shape moving one way: a run on another prompt (such as the
    researchers' eagle) ends with a note naming it and a prompt to try; a world prompt, or a Wan folder, gets none."""
    import argparse

    from workbench.commands import world_prompt_note

    assert main(["generate", "--prompt", "an eagle over the sea", "--frames", "3", "--out", str(tmp_path / "e"),
                 "--no-progress", "--no-video"]) == 0
    note = capsys.readouterr().out.splitlines()[-1]
    assert note.startswith("note: the embedded models know only their miniature world")
    assert "'an eagle over the sea' is not among its prompts" in note
    assert "a blue circle moving up" in note
    embedded, folder = argparse.Namespace(wan_dir=None), argparse.Namespace(wan_dir="wan_models/Wan2.1-T2V-1.3B")
    assert world_prompt_note(embedded, ["a red square moving left", "the blue circle moves up across the frame"]) \
        is None
    assert world_prompt_note(folder, ["an eagle"]) is None
    long = world_prompt_note(embedded, ["an eagle " * 500])  # (the note quoted all 4,500 characters)
    assert f"{('an eagle ' * 9)[:77]!r}"[:-1] + "...'" in long and len(long) < 400
    two_colours = world_prompt_note(embedded, ["a red and blue square moving left"])  # one colour, not two
    assert "'a red and blue square moving left' is not among" in two_colours
    assert "'x', 'y' and 1 more are not among" in world_prompt_note(embedded, ["x", "y", "a red square moving up", "z"])


def test_the_default_prompt_is_one_the_model_knows(tmp_path, capsys):
    """With no prompt, the embedded zoo runs a prompt of its miniature world (no note; generate, extract and
    intervene the same one), a Wan folder the researchers' eagle prompt."""
    from models import world
    from workbench.extract import DEFAULT_PROMPT, ExtractConfig, default_prompts

    (prompt,) = default_prompts(None)
    world.parse_prompt(prompt)  # one of the world's prompts (raises otherwise)
    assert ExtractConfig().prompts == [prompt] and ExtractConfig(model="teacher").prompts == [prompt]
    assert ExtractConfig(wan_dir="wan_models/Wan2.1-T2V-1.3B").prompts == [DEFAULT_PROMPT] and "eagle" in DEFAULT_PROMPT
    assert main(["generate", "--frames", "3", "--out", str(tmp_path / "g"), "--no-progress", "--no-video"]) == 0
    assert "note:" not in capsys.readouterr().out
    with safe_open(str(tmp_path / "g" / "p0000-s0.safetensors"), "pt") as f:
        assert f.metadata()["prompt"] == prompt


def test_a_rollout_that_diverges_is_named_and_writes_nothing(tmp_path, capsys):
    """A checkpoint whose activations overflow: its video was refused only when written ("video contains NaN or
    infinite values", exit 2, as for bad input), naming no sample; now the sample and the first latent frame that
    is not finite are named, nothing is written, and the exit status is 1 (the run failed)."""
    from conftest import diverging_checkpoint

    out = tmp_path / "g"
    assert main(["generate", "--checkpoint", str(diverging_checkpoint(tmp_path / "d.pt")), "--frames", "3", "--seed",
                 "5", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "sample p0000-s5 (prompt 'a red square moving right', seed 5): the rollout's latents are not finite " \
           "(NaN or inf) from latent frame 0 on" in err, err
    assert not list(out.glob("p0000-s5*"))  # (the folder holds its lock and prompt cache)


def test_the_bar_counts_every_samplers_forwards(tmp_path, capsys, monkeypatch):
    """The bar's total is the DiT forwards the run makes, and it ends at 100%: a multi-step sampler's CFG pair per
    step (and a causal one's two context passes per chunk), the last context pass kept with --live, and with
    --image chunk 0 only passing its context (the bar stopped at 10/14)."""
    import numpy as np
    from PIL import Image

    monkeypatch.delitem(__import__("sys").modules, "ipykernel", raising=False)
    image = tmp_path / "first.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    cases = {  # name: (arguments, forwards)
        "causal_cfg": (["--model", "df", "--frames", "6", "--num-inference-steps", "2"], 2 * (2 * 2 + 2)),
        "bidirectional": (["--model", "teacher", "--frames", "3", "--num-inference-steps", "2"], 2 * 2),
        "live": (["--frames", "3", "--live"], 4 + 1),
        "few_step_image": (["--frames", "7", "--image", str(image)], 1 + (4 + 1) + 4),
        "causal_cfg_image": (["--model", "df", "--frames", "7", "--num-inference-steps", "1", "--image", str(image)],
                             2 + (2 + 2) + (2 + 2)),
    }
    for name, (extra, forwards) in cases.items():
        capsys.readouterr()
        assert main(["generate", "--prompt", "a red kite", "--seed", "0", "--height", "32", "--width", "32",
                     "--out", str(tmp_path / name), "--no-video", *extra]) == 0, name
        bars = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generate: ")]
        assert bars and bars[-1].startswith("generate: 100%") and f"| {forwards}/{forwards} " in bars[-1], (name, bars)


def test_only_rank_0_draws_the_generate_bar(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank runs its share, and only rank 0 draws the bar (each rank's bar wrote over the
    others' in one log)."""
    import torch.distributed

    import workbench.extract as extract_mod

    monkeypatch.delitem(__import__("sys").modules, "ipykernel", raising=False)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)  # (no process group: one process)
    for rank in (1, 0):
        monkeypatch.setattr(extract_mod, "_dist", lambda rank=rank: (rank, 2, False))
        capsys.readouterr()
        assert main(["generate", "--prompt", "a red kite", "--frames", "3", "--seed", "0,1", "--height", "32",
                     "--width", "32", "--out", str(tmp_path / f"r{rank}"), "--no-video"]) == 0
        bars = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generate")]
        assert (bars == []) if rank else (bars and bars[-1].startswith("generate (rank 0): 100%")), (rank, bars)

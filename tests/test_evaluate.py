"""`workbench evaluate` end to end on the embedded default (a tiny grid on the CPU): a well-formed table, curves,
markdown and figure; a sliding-window rollout past 21 latent frames; two models compared; clear errors before any
work. And studies/world_report.py's table, comparison and figure on results whose answer is known."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models import world
from models.video import mp4_available
from models.wan.embedded import default_model
from studies import world_metrics as wm
from studies import world_report as wr
from workbench.cli import main


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def figure_json(html_text):
    return json.loads(re.search(r'id="fig-drift-json">(.*?)</script>', html_text, re.S).group(1).replace("<\\/", "</"))


def test_evaluate_writes_table_curves_and_figure(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--colours", "red", "--shapes", "square", "--directions", "left,up", "--seeds", "0,1",
                 "--frames", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 latent frames (9 pixel frames)" in printed
    assert "adherent: shown in half the frames, colour, shape, direction as prompted (%)" in printed
    assert "wrote videos.csv, curves.csv, summary.csv, summary.md, evaluate.html" in printed

    videos = pd.read_csv(out / "videos.csv")
    label = default_model().name if default_model() else "embedded"  # the zoo's default once shipped
    assert len(videos) == 4 and set(videos.model) == {label} and set(videos.seed) == {0, 1}
    assert list(videos.prompt.unique()) == ["a red square moving left", "a red square moving up"]
    assert {"named_colour", "found_colour", "found_direction", *wm.NUMBERS} <= set(videos.columns)
    assert videos.adherent.isin([0, 1]).all() and videos.detected.between(0, 1).all()

    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 9 and list(curves.frame) == list(range(9)) and (curves.videos == 4).all()
    assert {*wm.CURVES, "detected"} <= set(curves.columns)
    np.testing.assert_allclose(curves.confidence.mean(), videos.confidence.mean())  # the same 4 x 9 frames

    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "videos"] == 4 and summary.loc[0, "adherent"] == videos.adherent.mean()
    md = (out / "summary.md").read_text()
    assert f"| 3 latent frames (9 pixel frames) | {label} |" in md and "command: workbench evaluate" in md

    fig = figure_json((out / "evaluate.html").read_text())
    assert len(fig["data"]) == len(wr.FIGURE_CURVES)  # one model, one length: a line per panel
    assert fig["layout"]["legend"]["x"] > 1 and fig["layout"]["legend"]["y"] == 1  # beside the top panel, not over
    assert not list(tmp_path.glob("eval/.*tmp*"))  # atomic writes leave no temporary file


@pytest.mark.skipif(not mp4_available(), reason="--save-videos writes mp4: the video extra (pip install -e '.[video]')")
def test_evaluate_long_rollout_and_two_models(tmp_path, capsys):
    """Past 21 latent frames the rollout keeps a sliding window with sink frames; the same model twice gives
    identical paired videos, so the comparison finds no difference; videos are tracked in worker processes."""
    out = tmp_path / "long"
    assert main(["evaluate", "--prompt", "a blue circle moving right", "--seeds", "3", "--frames", "24",
                 "--local-attn-size", "6", "--sink-size", "3", "--model", "a=embedded", "--model", "b=embedded",
                 "--out", str(out), "--no-progress", "--save-videos", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "b vs a:" in printed and "24 latent frames" in printed
    videos = pd.read_csv(out / "videos.csv")
    assert list(videos.model) == ["a", "b"] and (videos.latent_frames == 24).all()
    numbers = videos[list(wm.NUMBERS)].to_numpy(float)
    np.testing.assert_array_equal(numbers[0], numbers[1])  # same noise, same model: the same video
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 2 * (1 + 4 * 23)
    assert (out / "videos" / "a" / "f24" / "p0000-s3.mp4").stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert "## b vs a" in md and "| 24 latent frames | a | b | b - a | b better | pairs |" in md  # (as the HTML's)
    assert "| trajectory error vs the named motion (px, RMS) |" in md.split("## b vs a")[1]


SCORE_VIDEO = wm.score_video


def _counting(monkeypatch, stop_after=None):
    """Count the videos evaluate scores (world_metrics.score_video calls); a KeyboardInterrupt, as Ctrl-C raises it,
    in place of call stop_after + 1."""
    calls = []
    real = SCORE_VIDEO

    def score(video, prompt):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(prompt)
        return real(video, prompt)

    monkeypatch.setattr(wm, "score_video", score)
    return calls


GRID = ["evaluate", "--colours", "red,blue", "--shapes", "circle", "--directions", "right", "--seeds", "0,1",
        "--frames", "3", "--no-progress"]


def test_evaluate_keeps_each_score_and_resumes_after_an_interrupt(tmp_path, capsys, monkeypatch):
    """Each video's score is on disk as soon as it is scored: Ctrl-C after 3 of 4 videos keeps those 3, and the same
    command then scores only the 4th; the tables equal those of a run that was never stopped. A missing or torn
    score file is scored again; a changed model (another key) scores everything again."""
    whole = tmp_path / "whole"
    assert main([*GRID, "--out", str(whole)]) == 0
    capsys.readouterr()

    out = tmp_path / "eval"
    calls = _counting(monkeypatch, stop_after=3)
    assert main([*GRID, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: 3 of 4 video(s) scored and kept in {out / 'scores'}" in err
    kept = sorted(p.relative_to(out / "scores").as_posix() for p in (out / "scores").rglob("*.json"))
    label = kept[0].split("/")[0]
    assert kept == [f"{label}/f3/p0000-s0.json", f"{label}/f3/p0000-s1.json", f"{label}/f3/p0001-s0.json"]
    assert not (out / "videos.csv").exists() and not list(out.rglob(".*tmp*"))

    calls = _counting(monkeypatch)
    assert main([*GRID, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert calls == ["a blue circle moving right"]  # only p0001-s1
    assert "resuming: 3 of 4 video(s) were scored by an earlier run" in printed
    assert "1 video(s) in" in (out / "summary.md").read_text() and "3 kept from an earlier run" in printed + (
        out / "summary.md").read_text()
    for name in ("videos.csv", "curves.csv", "summary.csv"):  # as if it had never stopped
        assert (out / name).read_text() == (whole / name).read_text(), name

    (out / "scores" / label / "f3" / "p0000-s1.json").unlink()
    (out / "scores" / label / "f3" / "p0001-s0.json").write_text('{"key": "trunc')  # a torn file (never by us)
    calls = _counting(monkeypatch)
    assert main([*GRID, "--out", str(out)]) == 0
    assert calls == ["a red circle moving right", "a blue circle moving right"]
    assert (out / "videos.csv").read_text() == (whole / "videos.csv").read_text()

    calls = _counting(monkeypatch)  # the folder's own DiT, not the zoo's student: another key, scored again
    assert main([*GRID, "--model", f"{label}=embedded", "--out", str(out)]) == 0
    assert len(calls) == 4


def test_evaluate_refuses_a_folder_another_run_writes(tmp_path, capsys):
    from workbench.store import StoreLock

    out = tmp_path / "eval"
    with StoreLock(out, what="an evaluate folder"):
        assert main([*GRID, "--out", str(out)]) == 75
    err = capsys.readouterr().err
    assert f"{str(out)!r} is being written by this process itself (another call of this Python session" in err
    assert "an evaluate folder takes one writer at a time" in err
    assert not (out / "scores").exists()


def test_video_scores_round_trip_through_json():
    video, _ = world.world_video("a green square moving down", 1, num_frames=9)
    score = wm.score_video(video, "a green square moving down")
    back = wm.VideoScore.from_json(json.loads(json.dumps(score.to_json())))
    assert (back.prompt, back.named, back.found) == (score.prompt, score.named, score.found)
    np.testing.assert_array_equal(list(back.numbers.values()), list(score.numbers.values()))  # NaN == NaN here
    for k, curve in score.curves.items():
        np.testing.assert_array_equal(back.curves[k], curve)
    assert any(np.isnan(c).any() for c in score.curves.values())  # a NaN went through (as null)


@pytest.mark.parametrize("argv, needle", [
    (["--colours", "purple"], "unknown colour 'purple'; the world knows red, green, blue, yellow"),
    (["--shapes", "square,star"], "unknown shape 'star'"),
    (["--prompt", "a purple kite moving left"],
     "names 0 colours []; the world needs exactly one of red, green, blue, yellow; and 0 shapes []; the world needs "
     "exactly one of square, circle"),
    (["--shapes", ""], "--shapes '': give at least one of square, circle"),
    (["--frames", "20"], "multiples of 3"),
    (["--seeds", "x"], "seed 'x'"),
    (["--seeds", "all"], "seed 'all': give numbers"),
    (["--workers", "-1"], "--workers -1: use 0"),
    (["--model", "nothing-here"],
     "'nothing-here' is no model name (embedded, teacher, df, ode, dmd, sid), Wan folder or checkpoint file"),
    (["--model", "embedded,fast"], "unknown option 'fast'"),
    (["--model", "../x=embedded"], "label '../x' names folders under --out"),
    (["--model", "a|b=embedded"], "label 'a|b' names folders under --out and columns of the tables"),
    (["--model", "pairs=embedded"], "label 'pairs' is a column of the comparison table"),
    (["--guidance-scale", "nan"], "--guidance-scale nan: give a finite number"),
    (["--sink-size", "-1"], "--sink-size -1: give 0 or more"),
    (["--model", "embedded", "--model", "embedded"], "['embedded'] is given twice"),
    (["--compare", "a,b"], "give two different model labels"),
    (["--checkpoint", "missing.pt"], "--checkpoint 'missing.pt' does not exist"),
    (["--frames", "24", "--local-attn-size", "-1"], "local-attn-size"),
])
def test_evaluate_refuses_bad_input_before_work(tmp_path, capsys, argv, needle):
    assert main(["evaluate", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing made: the output folder comes after every check


def test_evaluate_refuses_a_file_named_as_a_comparison_column(tmp_path, capsys):
    """A checkpoint's file name is its label when none is typed: ties.pt would have put the tie count in model
    A's column of the comparison table."""
    (tmp_path / "ties.pt").write_bytes(b"")
    assert main(["evaluate", "--model", str(tmp_path / "ties.pt"), "--model", "embedded", "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "label 'ties' is a column of the comparison table" in err and "--model LABEL=SOURCE" in err
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_an_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["evaluate", "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_evaluate_refuses_a_folder_whose_scores_take_no_files(tmp_path, capsys, monkeypatch):
    """A colleague's evaluate folder opened up with `chmod g+w` on its top only: resuming it failed after 44 s of
    scoring, at the first score's write (exit status 1); its folders are checked before any work (found by QA)."""
    import os

    import models.files

    out = tmp_path / "ev"
    (out / "scores" / "dmd").mkdir(parents=True)
    denied = out / "scores" / "dmd"
    real_access = os.access
    monkeypatch.setattr(models.files.os, "access",  # (root passes any permission bits: the folder is denied here)
                        lambda p, mode, **kw: Path(p) != denied and real_access(p, mode, **kw))
    assert main(["evaluate", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"is not writable inside: {str(denied)!r} cannot take new files" in err and err.count("\n") == 1
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["scores", "scores/dmd"]


# ------------------------------------------------------------------------------------------------ report
def _videos(model, drift, adherent):
    rows = []
    for seed, (d, a) in enumerate(zip(drift, adherent)):
        rows.append({"model": model, "latent_frames": 84, "prompt": "a red square moving left", "seed": seed,
                     **{k: 0.0 for k in wm.NUMBERS}, "trajectory_drift": d, "adherent": a})
    return rows


def test_compare_models_finds_who_accumulates_less_error():
    videos = pd.DataFrame(_videos("df", [4.0, 6.0, 1.0, 5.0], [1, 0, 1, 1]) + _videos("sf", [1.0, 2.0, 3.0, 1.0],
                                                                                        [1, 1, 1, 1]))
    rows, lines = wr.compare_models(videos, "df", "sf")
    drift = rows[rows.metric == "trajectory_drift"].iloc[0]
    assert drift["df"] == 4.0 and drift["sf"] == 1.75 and drift["sf - df"] == -2.25
    assert drift["sf better (share of pairs)"] == 0.75 and drift["pairs"] == 4
    adherent = rows[rows.metric == "adherent"].iloc[0]
    assert adherent["df"] == 75 and adherent["sf"] == 100 and adherent["sf better (share of pairs)"] == 0.625
    # a video without a value (its object lost): both means over the pairs that have one, so b - a is their difference
    lost = videos.copy()
    lost.loc[lost.model == "df", "trajectory_error"] = [8.0, 1.0, 1.0, 1.0]
    lost.loc[(lost.model == "sf") & (lost.seed == 0), "trajectory_error"] = np.nan
    row = wr.compare_models(lost, "df", "sf")[0].query("metric == 'trajectory_error'").iloc[0]
    assert row["pairs"] == 3 and row["df"] == 1.0 and row["sf"] == 0.0 and row["sf - df"] == -1.0
    text = wr.comparison_text(rows, "df", "sf", markdown=True).splitlines()
    assert text[0] == "| 84 latent frames | df | sf | sf - df | sf better | pairs |"
    assert ("| adherent: shown in half the frames, colour, shape, direction as prompted (%) | 75 | 100 | +25 | 62% "
            "| 4 |"
            in text)
    assert "| jitter (px/frame^2, RMS) | 0.000 | 0.000 | +0.000 | all tie | 4 |" in text  # (not "50%")
    assert lines == ["84 latent frames: the trajectory error changes by +4.00 px (df) and +1.75 px (sf) from the first "
                     "to the last quarter of the video: sf accumulates less error on average, less in 3 of 4 paired "
                     "videos (two-sided sign test p = 0.62: not significant at the 5% level, more prompts or seeds "
                     "would tell); adherent 75% (df), 100% (sf)"]
    with pytest.raises(ValueError, match="model 'teacher' is not in the results; they hold \\['df', 'sf'\\]"):
        wr.compare_models(videos, "df", "teacher")
    same = pd.DataFrame(_videos("df", [4.0, 6.0], [1, 1]) + _videos("sf", [4.0, 6.0], [1, 1]))
    _, (line,) = wr.compare_models(same, "df", "sf")  # a tie names no model
    assert "the two accumulate the same error on average (2 of 2 paired videos tie)" in line
    assert "accumulates less" not in line
    few = pd.DataFrame(_videos("df", [1.0, 1.0, 1.0, 9.0], [1, 1, 1, 1]) + _videos("sf", [2.0, 2.0, 1.0, 1.0],
                                                                                     [1, 1, 1, 1]))
    _, (line,) = wr.compare_models(few, "df", "sf")  # sf less on average (1.5 against 3), yet more in 2 of 4 pairs
    assert ("sf accumulates less error on average, though less in only 1 of 4 paired videos and more in 2: the mean "
            "rests on a few large differences (two-sided sign test p = 1") in line


def test_sign_test_by_hand():
    assert wr.sign_test(3, 1) == 2 * (4 + 1) / 16  # P(a 3:1 split or more uneven, either way) of 4 fair coins
    assert wr.sign_test(10, 0) == 2 / 1024 and wr.sign_test(0, 10) == 2 / 1024
    assert wr.sign_test(2, 2) == 1.0 and wr.sign_test(0, 0) == 1.0


def test_table_and_curves_of_rendered_videos():
    """Rendered ground truth as a "model": a perfect table, flat curves, one trace per model and length."""
    results = []
    for seed in (0, 1):
        for prompt in ("a green circle moving up", "a yellow square moving left"):
            video, _ = world.world_video(prompt, seed, num_frames=9)
            results.append(("truth", 3, seed, wm.score_video(video, prompt)))
    summ = wr.summary(wr.videos_frame(results))
    assert summ.loc[("truth", 3), "videos"] == 4 and summ.loc[("truth", 3), "adherent"] == 1
    text = wr.table_text(summ)
    assert re.search(r"adherent: shown in half the frames, colour, shape, direction as prompted \(%\)\s+100\n", text)
    assert re.search(r"colour error \(RGB distance\)\s+0.000\n", text)
    assert not [c for c in summ.columns if c.endswith("_videos")]  # (every mean is over all 4)
    blank = wm.score_video(np.zeros_like(world.world_video("a red circle moving up", 0, num_frames=9)[0]),
                           "a red circle moving up")
    lost = wr.summary(wr.videos_frame(results + [("truth", 3, 2, blank)]))
    assert lost.loc[("truth", 3), "videos"] == 5 and lost.loc[("truth", 3), "trajectory_error_videos"] == 4
    assert lost.loc[("truth", 3), "trajectory_error"] == summ.loc[("truth", 3), "trajectory_error"]
    assert "adherent_videos" not in lost  # (a blank video is not adherent: 0, a value)
    text = wr.table_text(lost)
    assert re.search(r"trajectory error vs the named motion \(px, RMS\)\s+0.\d\d \(4 of 5\)\n", text), text
    assert re.search(r"adherent: shown in half the frames, colour, shape, direction as prompted \(%\)\s+80\n", text)
    curves = wr.curves_frame(results)
    assert len(curves) == 9 and (curves.confidence > 0.999).all() and (curves.detected == 1).all()
    assert (curves.trajectory_error < 0.03).all()
    fig = wr.drift_figure(curves)
    assert len(fig.data) == len(wr.FIGURE_CURVES) and fig.layout.legend.orientation == "v" and fig.layout.legend.x > 1


def test_model_specs_name_weights_and_samplers(tmp_path):
    from models.wan.embedded import EMBEDDED_DIR
    from workbench.cli import build_parser
    from workbench.commands.evaluate import ModelChoice, select_models

    ck = tmp_path / "dmd.pt"
    ck.write_bytes(b"")
    args = build_parser().parse_args(["evaluate", "--model", f"sf={ck},ema", "--model", str(ck), "--model",
                                      "t=embedded,sampler=bidirectional", "--model", str(EMBEDDED_DIR),
                                      "--sampler", "causal_multi_step_cfg"])
    assert select_models(args) == [
        ModelChoice("sf", None, str(ck), True, "causal_multi_step_cfg"),
        ModelChoice("dmd", None, str(ck), False, "causal_multi_step_cfg"),
        ModelChoice("t", str(EMBEDDED_DIR), None, False, "bidirectional"),
        ModelChoice("embedded", str(EMBEDDED_DIR), None, False, "causal_multi_step_cfg")]
    # without --model, the shared model arguments name one model
    args = build_parser().parse_args(["evaluate", "--checkpoint", str(ck), "--use-ema"])
    assert select_models(args) == [ModelChoice("dmd-ema", None, str(ck), True, "causal_few_step")]
    # --sampler reaches the zoo's models too (it was the zoo model's own, silently): the default, and a named one
    from workbench.commands.evaluate import model_names

    def sampler_of(*argv):
        return [c.sampler for c in select_models(build_parser().parse_args(["evaluate", *argv]))]

    assert sampler_of() == ["causal_few_step"] and sampler_of("--sampler", "bidirectional") == ["bidirectional"]
    assert sampler_of("--model", "teacher") == [model_names()["teacher"].sampler] == ["bidirectional"]
    assert sampler_of("--model", "dmd", "--model", "ode,sampler=causal_few_step", "--sampler", "bidirectional") == [
        "bidirectional", "causal_few_step"]


def test_a_model_whose_rollouts_diverge_is_scored_as_blank_videos_and_named(tmp_path, capsys):
    """Its videos are NaN: the tracker's "the video holds NaN or infinite values" ended the run in a traceback; now
    each scores as a blank video (adherent 0), its saved frames draw NaN black, and a note names it."""
    from conftest import diverging_checkpoint

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(diverging_checkpoint(tmp_path / "d.pt")), "--colours", "red",
                 "--shapes", "square", "--directions", "left", "--seeds", "0", "--frames", "3", "--save-videos",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "note: 1 rollout(s) were not finite (NaN or inf: the activations overflowed), each scored as a blank " \
           "video" in printed and "at 3 latent frames, p0000-s0" in printed, printed
    videos = pd.read_csv(out / "videos.csv")
    assert len(videos) == 1 and videos.adherent[0] == 0 and videos.detected[0] == 0
    assert len(list(out.rglob("*.png"))) == 1

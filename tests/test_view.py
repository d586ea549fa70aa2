"""`workbench view` and `workbench generate --live` on the embedded default model.

Data: one run of `extract` (layers 0-1, seeds 0 and 1, 9 latent frames = 3 chunks) and one of `generate --live`
with the same prompt and seeds, whose mp4s pair with the store by sample id. Checked without a browser: the pixel
<-> latent frame mapping against the VAE's own streaming decoder, chunks from the store's labels, the JSON
endpoints (values, selection, errors), the live stream against the store and the decoded latents. Then in
Debian's chromium (tests/browser.py): the page plays the store's video and its maps change as the time slider
moves, and a live stream's chunks appear as they are written.
"""

import json
import os
import shlex
import shutil
import threading
import urllib.error
import urllib.request

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from models.video import mp4_available, to_uint8_frames, write_mp4
from models.wan.embedded import EMBEDDED_DIR
from models.wan.vae import WanVAE
from browser import chromium, png_pixels
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.store import open_store
from workbench.store_guard import StoreChanged
from workbench.view import stream
from workbench.view.server import start
from workbench.view.sources import (StoreSource, StreamSource, latent_of_pixel, open_source, pixel_span,
                                    step_label)

F, T = 9, 33  # latent frames (3 chunks of 3), pixel frames 1 + 4 (F - 1)
# a store's videos are generate's mp4s, which need the video extra (the README's CPU install leaves it out)
needs_mp4 = pytest.mark.skipif(not mp4_available(), reason="mp4 needs the video extra: pip install -e '.[video]'")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """D/x.zarr (a store), D/x/ (generate --live: mp4s, latents and the live stream), D/plain/ (no --live)."""
    d = tmp_path_factory.mktemp("view")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["extract", "--layers", "0-1", "--seed", "0,1", "--frames", str(F), "--out", str(d / "x.zarr"),
                     "--no-progress"]) == 0
        assert main(["generate", "--seed", "0,1", "--frames", str(F), "--live", "--layers", "0-1",
                     "--out", str(d / "x"), "--no-progress"]) == 0
        assert main(["generate", "--seed", "0", "--frames", str(F), "--no-video", "--out", str(d / "plain"),
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return d


def get(server, path):
    """(status, parsed JSON or raw bytes) of a GET."""
    try:
        with urllib.request.urlopen(server.url + path.lstrip("/")) as r:
            body, status, kind = r.read(), r.status, r.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        body, status, kind = err.read(), err.code, err.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body


@pytest.fixture(scope="module")
def store_server(runs):
    server, _ = start(open_source(runs / "x.zarr"), port=0)
    yield server
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------------------
# Frames


def test_pixel_frame_mapping_is_the_vae_decoders(one_thread):
    """Pushing latent frames one at a time through the VAE's streaming decoder: latent frame f gives exactly the
    pixel frames pixel_span(f), and latent_of_pixel maps each of them back to f (21 -> 81 frames)."""
    vae = WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth")
    decoder = vae.stream_decoder()
    latents = torch.randn(1, 21, 16, 2, 2)
    for f in range(21):
        first = decoder.frames_out
        t = decoder.push(latents[:, f : f + 1]).shape[2]
        assert (first, first + t) == pixel_span(f)
        assert [latent_of_pixel(p) for p in range(first, first + t)] == [f] * t
    assert decoder.frames_out == 81 and latent_of_pixel(80) == 20


# ------------------------------------------------------------------------------------------------------
# JSON endpoints of a store and its videos


def test_the_step_menu_writes_timesteps_to_one_decimal_as_the_reports():
    """A shifted schedule's t=833.333 read 833.333 in the viewer's step menu and 833.3 in the reports."""
    assert step_label(dict(step=1, timestep=833.3333, phase="denoise", cfg="none")) == "1 · t=833.3 · denoise"
    assert step_label(dict(step=2, timestep=1000.0, phase="context", cfg="cond")) == "2 · t=1000 · context · cond"


@needs_mp4
def test_meta_and_state_come_from_the_store(runs, store_server):
    ds = open_store(runs / "x.zarr")
    status, meta = get(store_server, "/api/meta")
    assert status == 200
    assert meta["pixel_frames"] == T and meta["pixel_to_latent"] == [latent_of_pixel(t) for t in range(T)]
    assert meta["pixel_to_latent"][:10] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert meta["layers"] == [0, 1] and meta["heads"] == [0, 1, 2, 3]
    assert [s["step"] for s in meta["steps"]] == ds["step"].values.tolist()
    assert meta["steps"][4]["phase"] == "context" and meta["steps"][0]["label"] == "0 · t=1000 · denoise"
    assert [(s["sample"], s["seed"], s["video"]) for s in meta["samples"]] == [("p0000-s0", 0, True),
                                                                              ("p0000-s1", 1, True)]
    assert meta["samples"][0]["prompt"] == str(ds["prompt"].values[0])
    status, state = get(store_server, "/api/state?sample=p0000-s1")
    assert status == 200 and state["frames_ready"] == T and state["done"]
    assert [(c["chunk"], c["query_frames"], c["pixel_first"], c["pixel_stop"]) for c in state["chunks"]] == [
        (0, [0, 1, 2], 0, 9), (1, [3, 4, 5], 9, 21), (2, [6, 7, 8], 21, 33)]


def test_chunks_follow_the_store_labels_not_a_count(runs, tmp_path):
    """A store whose query_chunk says [0 | 1 2 3 | 4 5 6 | 7 8] (a first frame of its own): the viewer's chunks
    are those labels."""
    ds = open_store(runs / "x.zarr").load()
    labels = np.array([0, 1, 1, 1, 2, 2, 2, 3, 3])
    relabelled = ds.assign_coords(query_chunk=("query_frame", labels), key_chunk=("key_frame", labels))
    relabelled.to_zarr(tmp_path / "r.zarr", zarr_format=3, consolidated=False)
    state = StoreSource(tmp_path / "r.zarr").state("p0000-s0")
    assert [(c["chunk"], c["query_frames"], c["pixel_first"], c["pixel_stop"]) for c in state["chunks"]] == [
        (0, [0], 0, 1), (1, [1, 2, 3], 1, 13), (2, [4, 5, 6], 13, 25), (3, [7, 8], 25, 33)]


@needs_mp4
def test_attention_and_frames_per_sample(runs, store_server):
    ds = open_store(runs / "x.zarr")
    for sample in ("p0000-s0", "p0000-s1"):
        status, attn = get(store_server, f"/api/attn?sample={sample}&layer=1&step=2")
        want = ds.attn_mass.sel(sample=sample, layer=1, step=2).transpose("head", "query_frame", "key_frame").values
        got = np.array([[[np.nan if v is None else v for v in row] for row in h] for h in attn["values"]])
        assert status == 200 and got.shape == (4, F, F)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)  # NaN where the store has NaN
        assert attn["vmax"] == pytest.approx(float(np.nanmax(want)), rel=1e-5)
    a = get(store_server, "/api/attn?sample=p0000-s0&layer=1&step=2")[1]["values"]
    b = get(store_server, "/api/attn?sample=p0000-s1&layer=1&step=2")[1]["values"]
    assert a != b  # the two seeds attend differently
    video = iio.imread(runs / "x" / "p0000-s1.mp4")
    status, body = get(store_server, "/api/frame?sample=p0000-s1&t=17")
    frame = iio.imread(body)
    assert status == 200 and frame.shape == video.shape[1:]
    assert np.abs(frame.astype(int) - video[17]).mean() < 6  # JPEG of that frame
    assert np.abs(frame.astype(int) - video[16]).mean() > np.abs(frame.astype(int) - video[17]).mean()


@pytest.mark.parametrize("path, status, words", [
    ("/api/state?sample=p0009-s0", 400, ["p0009-s0", "p0000-s0", "p0000-s1"]),
    ("/api/attn?sample=p0000-s0&layer=5&step=0", 400, ["layer 5", "[0, 1]"]),
    ("/api/attn?sample=p0000-s0&layer=0&step=x", 400, ["step x", "[0, 1, 2, 3, 4]"]),
    ("/api/attn?sample=p0000-s0&layer=0", 400, ["'step'"]),
    ("/api/frame?sample=p0000-s0&t=33", 400, ["pixel frame 33", "0-32"]),
    ("/api/nothing", 404, ["meta, state, attn or frame"]),
    ("/api/attn?sample=p0000-s0&layer=0&step=0&stat=attn_logit", 400,  # (it served attn_mass, saying nothing)
     ["/api/attn takes sample, layer, step, not ['stat'] (it serves attn_mass)"]),
])
def test_bad_requests_say_what_is_allowed(store_server, path, status, words):
    got, body = get(store_server, path)
    assert got == status and all(w in body["error"] for w in words) and "np.str_" not in body["error"], body


def test_a_port_or_host_that_cannot_serve_names_the_flag_to_change(runs, store_server, capsys):
    """A port in use: another --port; a host this machine cannot bind (it said to change the port for both)."""
    port = store_server.server_address[1]
    assert main(["view", str(runs / "x.zarr"), "--port", str(port)]) == 2
    assert "choose another --port (0: any free one)" in capsys.readouterr().err
    assert main(["view", str(runs / "x.zarr"), "--host", "192.0.2.1", "--port", "0"]) == 2  # (TEST-NET: not ours)
    assert "choose another --host" in capsys.readouterr().err


def test_a_viewer_on_this_machine_answers_its_own_names_only(store_server):
    """DNS rebinding: a page of another site whose name resolves to 127.0.0.1 reached /api/ with its own name in
    the Host header; the viewer (bound to 127.0.0.1) answers 127.0.0.1 and localhost only."""
    port = store_server.server_address[1]
    for host, status in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), ("LOCALHOST.", 200),
                         (f"[::1]:{port}", 200), (f"attacker.example:{port}", 403),
                         ("127.0.0.1.attacker.example", 403)):
        request = urllib.request.Request(store_server.url + "api/meta", headers={"Host": host})
        try:
            with urllib.request.urlopen(request) as r:
                got, body = r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            got, body = err.code, json.loads(err.read())
        assert got == status, (host, body)
        assert status == 200 or "the viewer serves this machine's own names only" in body["error"]
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port)  # an HTTP/1.0-style request without a Host header
    conn.putrequest("GET", "/api/meta", skip_host=True)
    conn.endheaders()
    assert conn.getresponse().status == 200
    conn.close()


def test_failures_and_a_deleted_store_are_errors_not_blank_maps(runs, tmp_path, monkeypatch, capsys):
    """Anything that fails in an answer is a 500 naming it (it was an empty reply, and the page showed nothing);
    a store deleted while the viewer runs is an error (zarr read its chunks as NaN: every cell "not attended");
    a server started before its source (view --wait) says what it waits for."""
    from workbench.view.server import ViewerServer

    shutil.copytree(runs / "x.zarr", tmp_path / "c.zarr")
    source = open_source(tmp_path / "c.zarr")
    server, _ = start(source, port=0)
    try:
        monkeypatch.setattr(source, "frame", lambda *a: 1 / 0)
        status, body = get(server, "/api/frame?sample=p0000-s0&t=0")
        assert status == 500 and body["error"] == "the viewer failed to answer /api/frame: ZeroDivisionError: " \
            "division by zero"
        assert "ZeroDivisionError" in capsys.readouterr().err  # the traceback, on the terminal
        os.replace(tmp_path / "c.zarr", tmp_path / "old.zarr")  # another run's --overwrite: a new folder swapped in
        shutil.copytree(runs / "x.zarr", tmp_path / "c.zarr")
        status, body = get(server, "/api/attn?sample=p0000-s1&layer=0&step=0")
        assert status == 409 and "c.zarr was replaced after it was opened" in body["error"]
        assert body["error"].endswith("(stop this `workbench view` and start it again)")
        shutil.rmtree(tmp_path / "c.zarr")
        status, body = get(server, "/api/attn?sample=p0000-s0&layer=0&step=0")
        assert status == 400 and "c.zarr' is gone (deleted or moved while the viewer ran)" in body["error"]
    finally:
        server.shutdown()
        server.server_close()
    waiting = ViewerServer(None, port=0, waiting_for="runs/live/live.json")
    threading.Thread(target=waiting.serve_forever, daemon=True).start()
    try:
        assert get(waiting, "/api/meta") == (200, {"waiting": "runs/live/live.json"})
        status, body = get(waiting, "/api/state?sample=p0000-s0")
        assert status == 400 and "waiting for runs/live/live.json" in body["error"]
    finally:
        waiting.shutdown()
        waiting.server_close()


@needs_mp4
def test_finding_videos(runs, tmp_path, capsys):
    store = runs / "x.zarr"
    assert set(open_source(store).videos) == {"p0000-s0", "p0000-s1"}  # runs/x.zarr -> runs/x/pPPPP-sS.mp4
    only = open_source(store, video=str(runs / "x" / "p0000-s1.mp4"), sample="p0000-s1")
    assert list(only.videos) == ["p0000-s1"] and only.state("p0000-s0")["frames_ready"] == 0
    assert only.frame("p0000-s0", 3) is None
    lone = tmp_path / "lone.zarr"
    shutil.copytree(store, lone)
    assert open_source(lone).videos == {}
    # `workbench view` on it says where it looked and how a video is made (it said only "0 video(s)")
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "view", str(lone), "--port", "0"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(EMBEDDED_DIR.parents[1])})
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "(0 video(s))" in lines[0], lines
    make = (f"workbench generate --model dmd --frames {F} --prompt 'a red square moving right' --seed 0 --out "
            f"{tmp_path / 'lone'}")
    assert lines[1] == (f"note: no video of its samples was found ({tmp_path / 'lone' / 'p0000-s0.mp4'}, or beside "
                        f"the store); `{make}` makes p0000-s0's with the store's model and settings (another --seed, "
                        "the others'); --video PATH names one\n"), lines
    assert open_source(lone).state("p0000-s0")["make_video"] == make  # (the page says it too)
    assert main([*shlex.split(make)[1:], "--no-progress"]) == 0  # as printed: the video the viewer then shows
    assert set(open_source(lone).videos) == {"p0000-s0"} and open_source(lone).state("p0000-s0")["make_video"] is None
    # a video that does not fit the store's frames, one file for several samples, a path that is no store
    write_mp4(np.zeros((21, 16, 16, 3), np.uint8), tmp_path / "short.mp4")
    assert main(["view", str(store), "--video", str(tmp_path / "short.mp4"), "--sample", "p0000-s0"]) == 2
    assert "has 21 frames" in capsys.readouterr().err
    assert main(["view", str(store), "--video", str(runs / "x" / "p0000-s0.mp4")]) == 2
    assert "--sample" in capsys.readouterr().err
    assert main(["view", str(tmp_path)]) == 2
    assert "neither a store" in capsys.readouterr().err
    # a video replaced after the store was opened (another run's --save-videos): said, never shown as this store's
    copy = tmp_path / "y.zarr"
    shutil.copytree(store, copy)
    shutil.copytree(runs / "x", tmp_path / "y", ignore=shutil.ignore_patterns("*.live", "live.json"))
    source = open_source(copy)
    first = source.frame("p0000-s0", 3).copy()
    shutil.copy(runs / "x" / "p0000-s1.mp4", tmp_path / "new.mp4")
    (tmp_path / "new.mp4").replace(tmp_path / "y" / "p0000-s0.mp4")
    with pytest.raises(StoreChanged, match="p0000-s0.mp4 was replaced or removed after the store was opened"):
        source.frame("p0000-s0", 3)
    assert "was replaced or removed" in source.state("p0000-s0")["video_error"]
    assert open_source(copy).frame("p0000-s0", 3) is not None and first.any()


@needs_mp4
def test_a_store_given_as_dot_through_a_link_or_without_zarr_finds_its_own_places(runs, tmp_path, monkeypatch):
    """`export-legacy .`, `report .` and `view .` inside a store raised "has an empty name" (the legacy folder, an
    effects store's videos folder) or gave the page an empty title; a store given through a link found no video; a
    store named without .zarr, or with dots in its name, sent the user to a folder of another name (run.v1.5 ->
    run.v1/) or into the store itself (`generate --out` the store's folder)."""
    import argparse

    from workbench import legacy
    from workbench.commands.evaluate import parse_model_spec
    from workbench.intervene import videos_dir
    from workbench.view.sources import videos_folder

    store = runs / "x.zarr"
    assert videos_folder(store) == runs / "x" and videos_folder(tmp_path / "run.v1.5") == tmp_path
    assert videos_folder(tmp_path / "ns") == tmp_path
    from workbench.view.sources import find_videos  # (nor another store's STORE.mp4: run.v1.5 is not run.v1)

    (tmp_path / "run.v1.mp4").touch()
    assert find_videos(tmp_path / "run.v1.5", None, ["p0000-s0"]) == {}
    (tmp_path / "alias.zarr").symlink_to(store)
    assert set(open_source(tmp_path / "alias.zarr").videos) == {"p0000-s0", "p0000-s1"}
    monkeypatch.chdir(store)
    assert legacy.default_out(".") == runs / "x_legacy" and videos_dir(".") == runs / "x_videos"
    assert open_source(".").name == "x.zarr"
    monkeypatch.chdir(runs / "x")
    assert parse_model_spec(".", argparse.Namespace(sampler=None, wan_dir=None)).label == "x"


@needs_mp4
def test_a_video_of_another_run_is_never_shown_beside_the_store(runs, tmp_path, capsys):
    """Videos pair with a store by file name; the latents file generate wrote beside each (its metadata: prompt,
    seed, sampler, the weights' sha256, use_ema) says which run made it. Another model's video is refused when
    named with --video, and left out (the page says why) when found beside the store; the store's own pass."""
    from safetensors.torch import save_file

    store = runs / "x.zarr"
    assert not open_source(store).video_errors  # generate's videos of the store's own model, prompt and seeds
    other = tmp_path / "other"
    shutil.copytree(runs / "x", other, ignore=shutil.ignore_patterns("*.live", "live.json"))
    side = other / "p0000-s0.safetensors"
    with safe_open(str(side), "pt") as f:
        metadata = f.metadata()
    assert metadata["weights_sha256"] == open_store(store).attrs["fingerprint_fields"]["model"]["weights"]
    save_file(load_file(str(side)), str(side), metadata=dict(metadata, sampler="bidirectional",
                                                             weights_sha256="0" * 64))
    assert main(["view", str(store), "--video", str(other / "p0000-s0.mp4"), "--sample", "p0000-s0"]) == 2
    err = capsys.readouterr().err
    assert "was not made by this store's run of sample p0000-s0" in err
    assert "sampler 'bidirectional' (the store's: 'causal_few_step')" in err and "weights_sha256 '000" in err
    mixed = open_source(store, video=str(other))  # a folder: the matching video stays, the other is left out
    assert list(mixed.videos) == ["p0000-s1"] and list(mixed.video_errors) == ["p0000-s0"]
    state = mixed.state("p0000-s0")
    assert state["frames_ready"] == 0 and "sampler 'bidirectional'" in state["video_error"]
    assert state["video_error"].endswith(f"Make the video with `workbench generate --model dmd --frames {F} --prompt "
                                         f"'a red square moving right' --seed 0 --out {runs / 'x'}`, or name the "
                                         "right one with --video") and state["make_video"] is None  # (once: the error)
    beside = tmp_path / "other.zarr"  # found beside the store by name: left out, with the reason
    shutil.copytree(store, beside)
    assert set(open_source(beside).videos) == {"p0000-s1"}  # (its command replaces the video there: --overwrite)
    assert open_source(beside).video_errors["p0000-s0"].endswith(f"--out {other} --overwrite`, or name the right "
                                                                 "one with --video")
    # another model's store: the command names its model and sampler, or its video would be refused in turn
    import zarr

    attrs = zarr.open_group(beside, mode="r+").attrs  # (the store's recorded run, as a teacher store records it)
    c = yaml.safe_load(attrs["config_yaml"])
    c["extract"].update(model="teacher", sampler="bidirectional", num_inference_steps=8, guidance_scale=4.0,
                       checkpoint=None)
    attrs["config_yaml"] = yaml.safe_dump(c)
    teacher = open_source(beside)
    assert teacher.make_video("p0000-s1") == (f"workbench generate --model teacher --num-inference-steps 8 --frames "
                                              f"{F} --prompt 'a red square moving right' --seed 1 --out {other}")
    save_file(load_file(str(side)), str(side), metadata=dict(metadata, dtype="float64"))  # (only the dtype differs)
    assert main(["view", str(store), "--video", str(other / "p0000-s0.mp4"), "--sample", "p0000-s0"]) == 2
    assert "dtype 'float64' (the store's: 'float32')" in capsys.readouterr().err


@needs_mp4
def test_an_effects_store_shows_the_videos_its_own_runs_saved(tmp_path, one_thread, capsys):
    """An effects store replaced with --overwrite by a run without --save-videos kept the old run's videos beside
    it, and the viewer showed them as the new entries' (same labels, same samples: another rollout). A store whose
    attrs name no videos folder shows none; a resumed run that saves videos lists its entries' and the baseline's
    (rolled out again anyway), and says which stored entries stay without."""
    out = tmp_path / "fx.zarr"
    common = ["--frames", "3", "--capture", "0", "--world", "off", "--out", str(out), "--no-progress"]
    assert main(["intervene", "--ablate", "0:0", "--save-videos", *common]) == 0
    assert set(open_source(out).videos) == {"baseline · p0000-s0", "ablate-zero:L0.H0 · p0000-s0"}
    # (intervene makes an entry's video, not generate: no generate command for it, in a mismatch's message either)
    assert open_source(out).make_video("ablate-zero:L0.H0 · p0000-s0") is None
    assert main(["intervene", "--ablate", "0:0", "--overwrite", "--timestep-shift", "3", *common]) == 0
    assert (tmp_path / "fx_videos" / "baseline" / "p0000-s0.mp4").is_file()  # (left there: not the store's)
    assert "videos_dir" not in open_store(out).attrs and open_source(out).videos == {}
    capsys.readouterr()
    assert main(["intervene", "--ablate", "0:0", "--ablate", "0:1", "--save-videos", "--timestep-shift", "3",
                 *common]) == 0
    assert "note: ablate-zero:L0.H0 is in " in capsys.readouterr().out
    attrs = open_store(out).attrs
    assert attrs["videos_dir"] == "fx_videos" and attrs["video_entries"] == ["baseline", "ablate-zero:L0.H1"]
    assert set(open_source(out).videos) == {"baseline · p0000-s0", "ablate-zero:L0.H1 · p0000-s0"}  # (not L0.H0's:
    # the files there are the old store's)
    assert main(["intervene", "--ablate", "0:0", "--save-videos", "--timestep-shift", "3", *common]) == 0
    assert "nothing to do" in capsys.readouterr().out
    (tmp_path / "fx_videos" / "baseline" / "p0000-s0.png").unlink()
    assert main(["report", str(out), "--out", str(tmp_path / "fx.html")]) == 0  # (each missing video said, and why)
    page = (tmp_path / "fx.html").read_text()
    assert "No video of ablate-zero:L0.H0: made by a run without --save-videos." in page
    assert "No video of baseline: saved as fx_videos/LABEL/p0000-s0.png, which is no longer there" in page


# ------------------------------------------------------------------------------------------------------
# generate --live


def test_live_generate_streams_the_store_numbers_and_keeps_the_latents(runs):
    plain = load_file(str(runs / "plain" / "p0000-s0.safetensors"))["latents"]
    live = load_file(str(runs / "x" / "p0000-s0.safetensors"))["latents"]
    assert torch.equal(plain, live)  # the probe and the per-chunk decode leave the rollout bitwise alone
    manifest = stream.read_manifest(runs / "x")
    assert manifest["status"] == "done" and [s["sample"] for s in manifest["samples"]] == ["p0000-s0", "p0000-s1"]
    ds = open_store(runs / "x.zarr")
    vae = WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth")
    source = StreamSource(runs / "x")
    for entry in manifest["samples"]:
        sample = entry["sample"]
        assert entry["done"] and [c["chunk"] for c in entry["chunks"]] == [0, 1, 2]
        assert [c["query_frames"] for c in entry["chunks"]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        assert [c["pixel_frames"] for c in entry["chunks"]] == [[0, 9], [9, 21], [21, 33]]
        for layer in (0, 1):
            for step in range(5):  # the store's numbers: the same probe on the same rollout
                want = ds.attn_mass.sel(sample=sample, layer=layer, step=step).transpose("head", ...).values
                np.testing.assert_allclose(source.attn(sample, layer, step), want, rtol=1e-6, atol=1e-7)
        latents = load_file(str(runs / "x" / f"{sample}.safetensors"))["latents"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as `runs` decoded them: another thread count sums the convolutions in another order
        try:
            decoded = to_uint8_frames(vae.decode(latents[None])[0])  # [T, H, W, 3]
        finally:
            torch.set_num_threads(threads)
        streamed = np.stack([source.frame(sample, t) for t in range(T)])
        assert np.array_equal(streamed, decoded)
    state = source.state("p0000-s1")
    assert state["frames_ready"] == T and len(state["chunks"]) == 3 and state["status"] == "done"


def test_live_options_are_checked_first(tmp_path, capsys):
    assert main(["generate", "--layers", "0", "--out", str(tmp_path / "o")]) == 2
    assert "add --live" in capsys.readouterr().err
    assert main(["generate", "--live", "--layers", "9", "--out", str(tmp_path / "o")]) == 2
    assert "layer [9] out of range" in capsys.readouterr().err
    assert not (tmp_path / "o" / stream.MANIFEST).exists()


class Replay:
    """Writes a copy of stream folder src chunk by chunk, as `generate --live` did (its first sample, then with
    `next_sample` its second)."""

    def __init__(self, src, dst):
        self.src, manifest = src, stream.read_manifest(src)
        self.entries = manifest["samples"]
        self.writer = stream.StreamWriter(dst, num_frames=manifest["num_frames"],
                                          pixel_frames=manifest["pixel_frames"], fps=manifest["fps"],
                                          layers=manifest["layers"], heads=manifest["heads"], steps=[],
                                          command="replay")
        self.writer.manifest["steps"] = manifest["steps"]
        self.begin(self.entries[0])

    def begin(self, e) -> None:
        self.entry = e
        self.writer.begin_sample(e["sample"], prompt=e["prompt"], prompt_index=e["prompt_index"], seed=e["seed"])

    def next_sample(self) -> None:
        self.writer.end_sample(self.entry["sample"])
        self.begin(self.entries[self.entries.index(self.entry) + 1])

    def chunk(self, i: int) -> None:
        c = self.entry["chunks"][i]
        arrays = stream.read_chunk(self.src, c)
        self.writer.write_chunk(self.entry["sample"], c["chunk"], c["query_frames"], arrays["attn_mass"],
                                arrays["frames"], c["pixel_frames"][0])

    def finish(self) -> None:
        self.writer.end_sample(self.entry["sample"])
        self.writer.close("done")


def test_a_stream_in_progress(runs, tmp_path):
    Replay(runs / "x", tmp_path / "s").chunk(0)
    source = open_source(tmp_path / "s")
    state = source.state("p0000-s0")
    assert state["status"] == "running" and not state["done"] and state["frames_ready"] == 9
    assert [c["query_frames"] for c in state["chunks"]] == [[0, 1, 2]]
    attn = source.attn("p0000-s0", 1, 0)
    assert np.isfinite(attn[:, :3, :3]).all() and np.isnan(attn[:, 3:]).all()  # later chunks: not yet
    assert source.frame("p0000-s0", 8) is not None and source.frame("p0000-s0", 9) is None
    with pytest.raises(Exception, match="drop --video"):
        open_source(tmp_path / "s", video="x.mp4")


def test_a_stream_reads_its_own_chunk_files_only(runs, tmp_path):
    """A live.json from elsewhere may name any path as a chunk's file: one outside the folder was read and shown,
    and a pipe hung the viewer (every later request waited on its lock)."""
    Replay(runs / "x", tmp_path / "s").chunk(0)
    manifest = json.loads((tmp_path / "s" / "live.json").read_text())
    outside = tmp_path / "outside.npz"
    shutil.copyfile(tmp_path / "s" / manifest["samples"][0]["chunks"][0]["file"], outside)
    os.mkfifo(tmp_path / "s" / "pipe.npz")
    (tmp_path / "secret.txt").write_text("a key")
    (tmp_path / "s" / "secret.npz").symlink_to(tmp_path / "secret.txt")
    for name in (str(outside), "../outside.npz", "pipe.npz", "secret.npz"):
        manifest["samples"][0]["chunks"][0]["file"] = name
        (tmp_path / "s" / "live.json").write_text(json.dumps(manifest))
        with pytest.raises(WorkbenchError, match=f"names the chunk file {name!r}, which is not a file inside"):
            open_source(tmp_path / "s").attn("p0000-s0", 1, 0)
    (tmp_path / "s" / "linked.npz").symlink_to(outside)  # cp -rs of a stream: its chunks are links to .npz files
    manifest["samples"][0]["chunks"][0]["file"] = "linked.npz"
    (tmp_path / "s" / "live.json").write_text(json.dumps(manifest))
    assert np.isfinite(open_source(tmp_path / "s").attn("p0000-s0", 1, 0)[:, :3, :3]).all()


# ------------------------------------------------------------------------------------------------------
# In the browser


def cell_rgb(page, head: int, row: int, key_frame: int) -> list[int]:
    """The colour drawn for (the chunk's row-th query frame, key frame) in head's map."""
    return page.evaluate("""([h, r, k]) => {
        const c = document.querySelectorAll('#maps canvas')[h], L = c.layout, s = c.width / c.clientWidth;
        const x = (L.left + k * L.cell + L.cell / 2) * s, y = (L.rowY(r) + L.cellH / 2) * s;
        return Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)); }""", [head, row, key_frame])


GREY = [0xE2, 0xE2, 0xDE]  # cells that were not attended


def open_page(browser, url: str, frames: int):
    """A new page at url, once its first `frames` pixel frames are loaded; and the list its script errors go to."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url)
    page.wait_for_function(f"Number(document.body.dataset.framesLoaded) === {frames}")
    return page, errors


@needs_mp4
def test_browser_plays_a_store_and_its_maps_change_with_time(runs, store_server, tmp_path):
    ds = open_store(runs / "x.zarr")
    with chromium() as browser:
        page, errors = open_page(browser, store_server.url, T)
        slider = page.locator("#time")
        shots = {}
        for t, latent, chunk in ((4, 1, 0), (25, 7, 2)):  # moved as a user moves the slider
            slider.fill(str(t))
            assert f"pixel frame {t} (of 0–32) · latent frame {latent} · chunk {chunk}" in page.inner_text("#where")
            assert page.evaluate("viewer.current().chunk.chunk") == chunk
            shots[t] = (png_pixels(page.locator("#frame").screenshot()), png_pixels(page.locator("#maps").screenshot()),
                        page.inner_text("#colorbar-label"))
            page.screenshot(path=str(tmp_path / f"store-t{t}.png"))
        (frame_a, maps_a, scale_a), (frame_b, maps_b, scale_b) = shots[4], shots[25]
        assert frame_a.std() > 10 and maps_a.std() > 10  # both panes render something
        assert (frame_a != frame_b).any(axis=-1).mean() > 0.2  # another pixel frame
        assert (maps_a != maps_b).any(axis=-1).mean() > 0.05  # another chunk's maps
        vmax = float(np.nanmax(ds.attn_mass.sel(sample="p0000-s0", layer=0, step=0).values))
        assert scale_a == scale_b and f"max {vmax:.3f}" in scale_a  # one colour scale for the whole video
        # chunk 2 (t = 25): its rows attend to every key frame 0-8; chunk 0's rows (t = 4) only to 0-2
        assert cell_rgb(page, 0, 0, 8) != GREY
        slider.fill("4")
        assert cell_rgb(page, 0, 0, 8) == GREY and cell_rgb(page, 0, 0, 1) != GREY
        # what a screen reader gets of a map (a canvas): the on-screen query frame's largest key frames, in order
        label = page.get_attribute("#maps canvas", "aria-label")
        row = ds.attn_mass.sel(sample="p0000-s0", layer=0, step=0).isel(head=0).sel(query_frame=1).values
        first = int(np.nanargmax(row))
        assert label.startswith(f"head 0, query frame 1: key frame {first} {row[first]:.3f}, key frame "), label
        assert page.get_attribute("#time", "aria-valuetext").startswith("pixel frame 4 (of 0–32) · latent frame 1")
        # the chunk's first query frame is the bottom row, as in the notebooks' heatmaps (origin lower)
        box, L = page.locator("#maps canvas").first.bounding_box(), page.evaluate(
            "(() => { const L = document.querySelector('#maps canvas').layout;"
            " return {left: L.left, top: L.top, cell: L.cell, cellH: L.cellH, n: L.rows.length}; })()")
        assert L["cellH"] >= 14  # rows as tall as their labels, however thin the key-frame columns
        for row, query_frame in ((L["n"] - 1, 0), (0, 2)):  # screen rows from the top
            page.mouse.move(box["x"] + L["left"] + 1.5 * L["cell"], box["y"] + L["top"] + (row + 0.5) * L["cellH"])
            assert f"query frame {query_frame} · key frame 1 ·" in page.inner_text("#tooltip")
        # selectors: another layer redraws the maps; one head gives one large map; another sample
        before = png_pixels(page.locator("#maps").screenshot())
        page.select_option("#layer", "1")
        page.wait_for_function("document.body.dataset.attnLoaded.startsWith('p0000-s0/1/0')")
        assert not np.array_equal(before, png_pixels(page.locator("#maps").screenshot()))
        page.select_option("#head", "2")
        assert page.locator("#maps figure").count() == 1 and page.inner_text("#maps figcaption") == "head 2"
        page.click("#play")  # plays from where it is, at the video's fps, then pauses on a second click
        page.wait_for_function("viewer.t >= 12")
        page.click("#play")
        assert page.evaluate("viewer.playing") is False and page.inner_text("#play") == "▶ play"
        page.select_option("#sample", "p0000-s1")
        page.wait_for_function(f"document.body.dataset.attnLoaded.startsWith('p0000-s1/1/0') && "
                               f"Number(document.body.dataset.framesLoaded) === {T}")
        assert "seed 1" in page.inner_text("#prompt")
        page.screenshot(path=str(tmp_path / "store-head2-seed1.png"))
        assert not errors


def test_browser_shows_a_live_stream_as_its_chunks_arrive(runs, tmp_path):
    replay = Replay(runs / "x", tmp_path / "s")
    replay.chunk(0)
    server, _ = start(open_source(tmp_path / "s"), port=0)
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("Number(document.body.dataset.framesLoaded) === 9")
            assert "1 chunk(s) so far" in page.inner_text("#status")
            assert page.evaluate("viewer.current().chunk.chunk") == 0
            maps_a = png_pixels(page.locator("#maps").screenshot())
            for i, frames in ((1, 21), (2, 33)):
                replay.chunk(i)  # the page polls and follows the newest chunk
                page.wait_for_function(f"Number(document.body.dataset.framesLoaded) === {frames} && "
                                       f"viewer.t === {frames - 1}")
                assert page.evaluate("viewer.current().chunk.chunk") == i
                assert f"chunk {i}: latent frames {3 * i}–{3 * i + 2}" in page.inner_text("#where")
            page.screenshot(path=str(tmp_path / "live.png"))
            assert (maps_a != png_pixels(page.locator("#maps").screenshot())).any(axis=-1).mean() > 0.05
            replay.next_sample()  # the run goes on to its next sample: the page follows it
            replay.chunk(0)
            page.wait_for_function("viewer.sample === 'p0000-s1' && Number(document.body.dataset.framesLoaded) === 9")
            assert page.input_value("#sample") == "p0000-s1" and "seed 1" in page.inner_text("#prompt")
            page.focus("#follow")  # the follow box from the keyboard: space ticks it off (it played the video)
            page.keyboard.press(" ")
            assert page.evaluate("document.getElementById('follow').checked") is False
            assert page.evaluate("viewer.playing") is False
            page.keyboard.press(" ")
            assert page.evaluate("document.getElementById('follow').checked") is True
            replay.finish()
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
    finally:
        server.shutdown()
        server.server_close()


@needs_mp4
def test_browser_shows_an_effects_store_entry_by_entry(tmp_path):
    """`intervene --capture --save-videos` then `view`: each entry's rollout is an item of the sample menu with its
    own video and maps (key frames 0-2 knocked out: grey for later chunks, attended in the baseline); a menu item
    without a video shows an empty frame (the last sample's frame stayed under the text); the arrow keys on the
    focused time slider step one frame (two, before: the slider's own step and the page's)."""
    out = tmp_path / "fx.zarr"
    assert main(["intervene", "--knockout", "0-2", "--frames", str(F), "--capture", "0-1", "--save-videos",
                 "--world", "off", "--out", str(out), "--no-progress"]) == 0
    source = open_source(out)
    items = ["baseline · p0000-s0", "knockout0-2:all · p0000-s0"]
    assert [s["sample"] for s in source.samples()] == items and set(source.videos) == set(items)
    assert [s["intervention"] for s in source.samples()] == ["baseline", "knockout0-2:all"]
    (tmp_path / "fx.zarr").rename(tmp_path / "fx_renamed.zarr")  # (its videos found by its attr videos_dir)
    assert set(open_source(tmp_path / "fx_renamed.zarr").videos) == set(items)
    (tmp_path / "fx_renamed.zarr").rename(out)
    source.videos.pop(items[1])  # as if --save-videos had not written this one
    server, _ = start(source, port=0)
    try:
        with chromium() as browser:
            page, errors = open_page(browser, server.url, T)
            page.locator("#time").fill("12")  # chunk 1: query frames 3-5
            assert page.evaluate("viewer.current().chunk.chunk") == 1
            assert cell_rgb(page, 0, 0, 0) != GREY  # the baseline attends to frame 0
            page.locator("#time").focus()
            page.keyboard.press("ArrowRight")
            assert page.evaluate("viewer.t") == 13
            page.keyboard.press("ArrowLeft")
            assert page.evaluate("viewer.t") == 12
            page.select_option("#sample", items[1])
            page.wait_for_function(f"document.body.dataset.attnLoaded.startsWith({items[1]!r})")
            assert cell_rgb(page, 0, 0, 0) == GREY and cell_rgb(page, 0, 0, 3) != GREY  # knocked out, own chunk
            assert "no video of this entry: `workbench intervene ... --save-videos`" in page.inner_text("#no-video")
            drawn = page.evaluate("(() => { const c = document.getElementById('frame');"
                                  " return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
                                  ".some((v) => v !== 0); })()")
            assert not drawn
            page.screenshot(path=str(tmp_path / "effects.png"))
            assert not errors
    finally:
        server.shutdown()
        server.server_close()

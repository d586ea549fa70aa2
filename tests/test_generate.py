"""`workbench generate` end to end on the embedded default: latents, an mp4 with 1 + 4 (F - 1) frames at the
VAE's size, and a PNG grid; clear errors before any work."""

import imageio.v3 as iio
import torch
from safetensors.torch import load_file

from models.video import mp4_available
from workbench.cli import main


def test_generate_writes_latents_video_and_grid(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a red kite over the sea", "--frames", "6", "--seed", "3",
                 "--out", str(out), "--no-progress"]) == 0
    latents = load_file(str(out / "p0000-s3.safetensors"))["latents"]
    assert latents.shape == (6, 16, 12, 16) and torch.isfinite(latents).all()
    if mp4_available():
        frames = iio.imread(out / "p0000-s3.mp4")
        assert frames.shape == (1 + 4 * (6 - 1), 96, 128, 3)
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

"""A video of the same prompt, seed and model but another --height/--width is another video: never the store's."""

import pytest
import torch

from models.video import mp4_available
from workbench.cli import main
from workbench.view.sources import open_source


@pytest.mark.skipif(not mp4_available(), reason="mp4 needs the video extra")
def test_a_video_of_another_size_is_not_the_stores(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["extract", "--layers", "0", "--frames", "3", "--seed", "0", "--out", str(tmp_path / "x.zarr"),
                     "--no-progress"]) == 0
        assert main(["generate", "--frames", "3", "--seed", "0", "--height", "64", "--width", "96",
                     "--out", str(tmp_path / "x"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    source = open_source(tmp_path / "x.zarr")  # found beside the store by name: left out, with the reason
    assert list(source.videos) == [] and "latents of 3 frames x 8 x 12" in source.video_errors["p0000-s0"]
    assert main(["view", str(tmp_path / "x.zarr"), "--video", str(tmp_path / "x" / "p0000-s0.mp4")]) == 2
    assert "a video of 96 x 128 pixels" in capsys.readouterr().err

"""export-legacy of an image-to-video store: frame 0 (the image) is never denoised, so its rows at a denoising step
hold no attention by design; the files give them 0 (not attended), not NaN, and no note of an overflow."""

import numpy as np
import torch

from models import video, world
from workbench.cli import main
from workbench.legacy import legacy_record
from workbench.store import open_store


def test_image_rows_at_a_denoising_step_are_not_attended_not_overflowed(tmp_path, capsys):
    image = tmp_path / "first.png"
    video.write_png_grid(world.world_video("a green circle moving up", 0, num_frames=1)[0], str(image))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["extract", "--layers", "0", "--image", str(image), "--prompt", "a green circle moving up",
                     "--frames", "4", "--out", str(tmp_path / "i2v.zarr"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert main(["export-legacy", str(tmp_path / "i2v.zarr"), "--out", str(tmp_path / "legacy")]) == 0
    out = capsys.readouterr().out
    assert "not finite" not in out and "NaN" not in out
    record = torch.load(tmp_path / "legacy" / "p0000-s42" / "layer0.pt", weights_only=True)
    full = record["full_frame_attention"]
    assert not full.isnan().any() and (full[:, 0] == 0).all() and (full[:, 1:, 0] != 0).all()
    # at a context pass the image's rows did attend: a row with nothing finite there is an overflow (NaN), not 0
    ds = open_store(tmp_path / "i2v.zarr").load()
    context = int(ds.step.values[[str(p) == "context" for p in ds["phase"].values]][0])
    ds["attn_logit"].loc[dict(step=context, layer=0, query_frame=0)] = np.nan
    record = legacy_record(ds, str(ds["sample"].values[0]), 0, step=context)
    assert record["full_frame_attention"][:, 0].isnan().all()

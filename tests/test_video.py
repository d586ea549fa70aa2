"""Video and prompt-file I/O (models/video.py): mp4 re-opens with the right frames, size and colours, the PNG
grid has the documented size and layout, prompt files, output-folder checks."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import ModelInputError
from models.video import ensure_writable_dir, mp4_available, read_prompts, to_uint8_frames, write_mp4, write_png_grid

needs_ffmpeg = pytest.mark.skipif(not mp4_available(), reason='mp4 needs the video extra (imageio-ffmpeg)')


def _colour_video(t=9, h=32, w=48):
    """float [3, T, H, W]: red = +1, green = -1, blue ramps over time from -1 to +1."""
    v = torch.zeros(3, t, h, w)
    v[0], v[1] = 1.0, -1.0
    v[2] = torch.linspace(-1, 1, t).view(t, 1, 1)
    return v


def test_uint8_mapping_is_self_forcings():
    frames = to_uint8_frames(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(3, 1, 1, 4))
    assert frames.shape == (1, 1, 4, 3) and frames.dtype == np.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 128, 255, 255]  # round((x + 1) * 127.5), clamped


@needs_ffmpeg
def test_mp4_reopens_with_frames_size_fps_and_colours(tmp_path):
    path = write_mp4(_colour_video(), tmp_path / "out" / "clip.mp4", fps=16)
    reader = imageio.get_reader(str(path))
    frames = [f for f in reader]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    assert reader.get_meta_data()["fps"] == pytest.approx(16)
    means = np.stack([f.reshape(-1, 3).mean(0) for f in frames])      # [T, 3]
    assert np.all(np.abs(means[:, 0] - 255) < 8) and np.all(means[:, 1] < 8)
    assert means[0, 2] < 20 and means[-1, 2] > 235 and np.all(np.diff(means[:, 2]) > 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip.mp4"]  # no temp file left


@needs_ffmpeg
def test_mp4_from_uint8_frames(tmp_path):
    frames = np.zeros((5, 16, 24, 3), dtype=np.uint8)
    frames[:, :, :12] = 200
    path = write_mp4(frames, tmp_path / "u8.mp4", fps=8)
    back = imageio.mimread(str(path))
    assert len(back) == 5 and back[0].shape == (16, 24, 3)
    assert abs(back[2][:, :10].mean() - 200) < 8 and back[2][:, 14:].mean() < 8


def test_png_grid_size_and_layout(tmp_path):
    t, h, w = 9, 32, 48
    video = torch.stack([torch.full((h, w), -1 + 2 * i / (t - 1)) for i in range(t)])[None].expand(3, t, h, w)
    path = write_png_grid(video, tmp_path / "grid.png", ncols=4, pad=2)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (3 * h + 2 * 2, 4 * w + 3 * 2, 3)
    for i in range(t):
        r, c = divmod(i, 4)
        cell = img[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w]
        assert np.all(cell == round(i / (t - 1) * 255))
    assert np.all(img[h:h + 2] == 255)                                  # separator row
    sub = write_png_grid(video, tmp_path / "few.png", ncols=8, frames=[0, 4, 8], pad=0)
    assert Image.open(sub).size == (3 * w, h)


def test_png_grid_labels_frames_and_titles_without_touching_pixels(tmp_path):
    """label_frames: a strip above each frame names it (pixel frame i = latent ceil(i / 4)); a title goes above
    the grid in at most three lines; the frames' pixels are those of the unlabelled grid."""
    from models.video import label_height

    t, h, w = 9, 32, 160
    video = torch.stack([torch.full((h, w), -1 + 2 * i / (t - 1)) for i in range(t)])[None].expand(3, t, h, w)
    strip = label_height(h)
    img = np.asarray(Image.open(write_png_grid(video, tmp_path / "l.png", ncols=4, pad=2, label_frames=True,
                                               title="model · seed 0 · " + "long words " * 200)).convert("RGB"))
    top = 3 * strip + 2                                                   # the title wrapped to three lines
    assert img.shape == (top + 3 * (strip + h) + 2 * 2, 4 * w + 3 * 2, 3)
    for i in range(t):
        r, c = divmod(i, 4)
        y, x = top + r * (strip + h + 2) + strip, c * (w + 2)
        assert np.all(img[y:y + h, x:x + w] == round(i / (t - 1) * 255))  # untouched frame
        assert (img[y - strip:y, x:x + w] < 128).any()                    # its label is drawn
    for line in range(3):
        assert (img[line * strip:(line + 1) * strip] < 128).any()
    assert (img[3 * strip:top] == 255).all()                             # the pad below the title
    plain = np.asarray(Image.open(write_png_grid(video, tmp_path / "p.png", ncols=4, pad=2)).convert("RGB"))
    assert plain.shape == (3 * h + 2 * 2, 4 * w + 3 * 2, 3)               # no labels unless asked
    for small in (16, 32):  # narrow tiles: a shorter label, inside its own tile (they ran into each other)
        tiny = torch.zeros(3, 21, small, small)
        img = np.asarray(Image.open(write_png_grid(tiny, tmp_path / "t.png", ncols=5, pad=2, frames=range(0, 21, 5),
                                                   label_frames=True)).convert("RGB"))
        strip = img[:label_height(small)]
        for c in range(1, 5):  # the pad columns between the tiles' labels stay blank
            assert (strip[:, c * (small + 2) - 2:c * (small + 2)] == 255).all()
        assert (strip < 128).any()


def test_a_title_beyond_ascii_is_drawn_in_a_font_that_has_its_letters(tmp_path, monkeypatch):
    """Pillow's own font has no accents, Cyrillic or CJK ("café" came out "caf" and a box): a title it cannot draw
    is drawn in the font fontconfig names for those letters, where one on the machine has them."""
    import models.video as video_mod
    from models.video import _font, _lacks, font_for

    own = _font(14)
    assert _lacks(own, "aéс") == ["é", "с"]  # (the check itself: a has its glyph, é and Cyrillic с not)
    assert not isinstance(font_for("a red square moving right", 14).path, str)  # ASCII: Pillow's own (in memory)
    other = font_for("a café, синий круг", 14)
    if not isinstance(other.path, str):
        pytest.skip("no font on this machine has é and Cyrillic (fontconfig: none, or fc-match missing)")
    assert _lacks(other, "a café, синий круг") == []
    video = torch.zeros(3, 2, 32, 160)
    img = np.asarray(Image.open(write_png_grid(video, tmp_path / "c.png", title="синий круг")).convert("RGB"))
    monkeypatch.setattr(video_mod, "font_for", lambda text, size: _font(size))  # (as before: boxes)
    boxes = np.asarray(Image.open(write_png_grid(video, tmp_path / "b.png", title="синий круг"))
                       .convert("RGB"))
    assert img.shape == boxes.shape and not np.array_equal(img, boxes)


def test_read_prompts_strips_and_skips_empty_lines(tmp_path):
    """Blank lines before a prompt are named in a warning (indices count prompts; the researchers' count lines);
    trailing ones move no index and pass quietly."""
    import warnings

    from models.errors import ModelInputWarning

    f = tmp_path / "prompts.txt"
    f.write_text("  A cat on a beach.  \n\n\t\nA dog in the snow\r\n   \nlast line without newline")
    with pytest.warns(ModelInputWarning, match=r"blank lines 2, 3, 5 skipped, so a prompt's index"):
        assert read_prompts(f) == ["A cat on a beach.", "A dog in the snow", "last line without newline"]
    f.write_text("a cat\na dog\n\n  \n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_prompts(f) == ["a cat", "a dog"]
    f.write_bytes("\ufeffa red square moving right\r\na blue circle\r\n".encode())  # (a Windows editor's BOM)
    assert read_prompts(f) == ["a red square moving right", "a blue circle"]


def test_a_prompt_line_is_not_split_at_unicode_line_separators(tmp_path):
    """One line, one prompt: a form feed, U+0085 or U+2028 inside a line (text pasted from a web page or PDF) is
    not a line break for a file read line by line, as the researchers' reader reads it; str.splitlines made two
    prompts of it and moved every later prompt's index."""
    f = tmp_path / "prompts.txt"
    f.write_text("a red square\u2028moving right\na blue circle\x0cmoving up\ra green\x85square\n", encoding="utf-8")
    assert read_prompts(f) == ["a red square\u2028moving right", "a blue circle\x0cmoving up", "a green\x85square"]


def test_a_title_character_no_font_has_leaves_the_others_to_a_font_that_has_them():
    """An emoji no font on the machine draws must not send é (or Cyrillic) back to Pillow's own font, whose boxes
    they would be."""
    from models.video import _lacks, font_for

    if not isinstance(font_for("café", 14).path, str):
        pytest.skip("no font on this machine has é (fontconfig: none, or fc-match missing)")
    title = "café синий \U0010fffd"  # (a private-use code point: no font has it)
    assert _lacks(font_for(title, 14), title) == ["\U0010fffd"]


def test_empty_or_missing_prompt_file_is_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n  \n")
    with pytest.raises(ModelInputError, match="empty.txt"):
        read_prompts(empty)
    with pytest.raises(ModelInputError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_output_dir_is_created_and_checked(tmp_path):
    out = ensure_writable_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ModelInputError, match="a_file"):
        ensure_writable_dir(blocker / "sub")


@pytest.mark.parametrize("bad", [torch.zeros(4, 2, 8, 8), torch.zeros(3, 2, 8), np.zeros((2, 8, 8, 4), np.uint8),
                                 torch.full((3, 1, 8, 8), float("nan")), [1, 2, 3]])
def test_bad_videos_are_refused(tmp_path, bad):
    with pytest.raises(ModelInputError):
        write_mp4(bad, tmp_path / "x.mp4")


def test_odd_size_mp4_is_refused_but_png_grid_works(tmp_path):
    video = torch.zeros(3, 2, 15, 16)
    with pytest.raises(ModelInputError, match="even"):
        write_mp4(video, tmp_path / "odd.mp4")
    assert Image.open(write_png_grid(video, tmp_path / "odd.png", ncols=2, pad=1)).size == (33, 15)

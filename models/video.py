"""Video and prompt-file I/O: mp4 and PNG-grid writers, the researchers' prompt files, output-folder checks.

How it fits: the generate command decodes latents with `models.wan.vae` and hands the video here; prompts come
from a text file with one prompt per line. Accepted video forms (one video, no batch dimension):
  - float [3, T, H, W] in [-1, 1] (what `WanVAE.decode(...)[b]` gives; values outside are clamped), or
  - uint8 [T, H, W, 3].
Pixel mapping: uint8 = round((x + 1) / 2 * 255), i.e. Self-Forcing's `(video * 0.5 + 0.5) * 255`.
All writes are atomic (`models.files.atomic_write`: temp file in the same folder, then rename); call
`ensure_writable_dir` before any expensive work so a bad output path fails first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from models.errors import ModelInputError, ModelInputWarning
from models.files import ensure_writable_dir  # noqa: F401 (re-exported)
from models.files import atomic_write, relative_note


def mp4_available() -> bool:
    """Whether mp4 can be written here: `write_mp4` needs imageio-ffmpeg (its own ffmpeg binary, 165 MB), which
    the `video` extra installs (pip install -e ".[video]")."""
    import importlib.util

    return importlib.util.find_spec("imageio_ffmpeg") is not None


def nan_drawn_black(video: np.ndarray) -> tuple[np.ndarray, str]:
    """(video, note) for a float video [3, T, H, W] that may hold NaN or inf (a rollout that diverged), which
    `to_uint8_frames` refuses: NaN drawn black (-1), +-inf clipped; the note (" · not finite: NaN drawn black", or ""
    for a finite video) goes into its title."""
    if np.isfinite(video).all():
        return video, ""
    return np.nan_to_num(video, nan=-1.0, posinf=1.0, neginf=-1.0), " · not finite: NaN drawn black"


def to_uint8_frames(video) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3] (torch or numpy) -> uint8 numpy [T, H, W, 3]."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if not isinstance(video, torch.Tensor):
        raise ModelInputError(f"video must be a torch tensor or numpy array, got {type(video).__name__}")
    if video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ModelInputError(f"a uint8 video must be [T, H, W, 3], got {tuple(video.shape)}")
        frames = video
    else:
        if not video.is_floating_point() or video.ndim != 4 or video.shape[0] != 3:
            raise ModelInputError(
                f"a float video must be [3, T, H, W] in [-1, 1] (or uint8 [T, H, W, 3]), "
                f"got {video.dtype} {tuple(video.shape)}")
        if not torch.isfinite(video).all():
            raise ModelInputError("video contains NaN or infinite values")
        x = (video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5      # [3, T, H, W] in [0, 255]
        frames = x.round().to(torch.uint8).permute(1, 2, 3, 0)          # [T, H, W, 3]
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ModelInputError(f"video has an empty dimension: {tuple(frames.shape)} as [T, H, W, 3]")
    return np.ascontiguousarray(frames.cpu().numpy())


def write_mp4(video, path, fps: int = 16, quality: int = 8) -> Path:
    """Write an H.264 mp4 (yuv420p, so H and W must be even) at `fps` (Wan2.1: 16). Returns the path."""
    import imageio.v2 as imageio

    frames = to_uint8_frames(video)                                     # [T, H, W, 3]
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ModelInputError(f"mp4 (yuv420p) needs even height and width, got {h}x{w}; use write_png_grid")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ModelInputError(f"fps must be > 0, got {fps!r}")
    if not mp4_available():
        raise ModelInputError("writing mp4 needs imageio-ffmpeg: pip install -e \".[video]\"")
    path = Path(path)

    def write(tmp):
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                                    pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        if not mp4_complete(tmp):  # (ffmpeg that could not write its index, e.g. on a full disk: imageio says nothing)
            import errno
            import shutil

            full = shutil.disk_usage(path.parent).free < 64 * 2**20
            why = ("No space left on device (ffmpeg could not finish the mp4)" if full else
                   "ffmpeg could not finish the mp4 (no index at its end)")
            raise OSError(errno.ENOSPC if full else errno.EIO, why, str(path))

    atomic_write(path, write)
    return path


def mp4_complete(path) -> bool:
    """Whether an mp4's top-level boxes fill the file exactly and hold its media ('mdat') and its index ('moov',
    which ffmpeg writes last): a file whose writing stopped part way fails this."""
    import os

    size, pos, kinds = os.path.getsize(path), 0, set()
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                return False
            n, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if n == 1:  # (a 64-bit size follows the type)
                n = int.from_bytes(head[8:16], "big") if len(head) == 16 else 0
            elif n == 0:  # (the box runs to the end of the file)
                n = size - pos
            if n < 8:
                return False
            kinds.add(kind)
            pos += n
    return pos == size and {b"moov", b"mdat"} <= kinds


def write_png_grid(video, path, ncols: int = 8, frames: list[int] | None = None, pad: int = 2,
                   pad_value: int = 255, title: str | None = None, label_frames: bool = False,
                   temporal_stride: int = 4) -> Path:
    """Write the chosen frames (default: all) as one PNG grid, row by row, `ncols` per row, separated by `pad`
    pixels of `pad_value`. Size: width = ncols W + (ncols - 1) pad, height = rows H + (rows - 1) pad,
    with ncols = min(ncols, number of frames) and rows = ceil(frames / ncols).

    `label_frames` puts a strip of `label_height(H)` pixels above each frame naming it ("frame 20 = latent 5":
    pixel frame i comes from latent frame ceil(i / temporal_stride), the VAE's causal layout, 4 for Wan's and the
    miniature world's), so that a frame can be found in the attention maps, whose frames are latent frames; in
    narrow tiles every label takes a shorter form ("20 = lat 5", "20:5", "20"), and none where none fits.
    `title` (e.g. the model, the seed and the prompt) goes in a strip above the grid, wrapped to its width
    (three lines at most). The frames' pixels are never drawn on."""
    from PIL import Image, ImageDraw

    all_frames = to_uint8_frames(video)                                 # [T, H, W, 3]
    t, h, w, _ = all_frames.shape
    frames = list(range(t)) if frames is None else list(frames)
    bad = [i for i in frames if not isinstance(i, (int, np.integer)) or not -t <= i < t]
    if not frames or bad:
        raise ModelInputError(f"frames must be a non-empty list of indices in [0, {t}), got bad {bad[:10]}")
    if not isinstance(ncols, int) or ncols < 1:
        raise ModelInputError(f"ncols must be an int >= 1, got {ncols!r}")
    if pad < 0:
        raise ModelInputError(f"pad must be >= 0, got {pad}")
    ncols = min(ncols, len(frames))
    nrows = -(-len(frames) // ncols)
    label = label_height(h) if label_frames else 0
    cell_h = label + h
    width = ncols * w + (ncols - 1) * pad
    font = _font(int((label_height(h) - 2) / 1.2))  # (a line's glyphs reach 1.2 x the font size)
    title_font = font_for(title, font.size) if title else font  # (a prompt may hold more than ASCII)
    lines = _wrap(title, title_font, width - 8)[:3] if title else []
    top = (len(lines) * label_height(h) + pad) if lines else 0
    grid = np.full((top + nrows * cell_h + (nrows - 1) * pad, width, 3), pad_value, dtype=np.uint8)
    for n, i in enumerate(frames):
        r, c = divmod(n, ncols)
        y, x = top + r * (cell_h + pad) + label, c * (w + pad)
        grid[y:y + h, x:x + w] = all_frames[i]
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    ink = (0, 0, 0) if pad_value > 127 else (255, 255, 255)
    for k, line in enumerate(lines):
        draw.text((4, k * label_height(h) + 1), line, fill=ink, font=title_font)  # (+1: a ring above Å stays in)
    # every tile's label in one form: the longest that fits every tile (8 px at the least), else none
    forms = (lambda i, j: f"frame {i} = latent {j}", lambda i, j: f"{i} = lat {j}", lambda i, j: f"{i}:{j}",
             lambda i, j: f"{i}")
    labels = [(i % t, -(-(i % t) // temporal_stride)) for i in frames] if label else []
    for form in forms if labels else ():
        texts = [form(i, j) for i, j in labels]
        small = _fit(max(texts, key=len), font, w - 2)
        if all(draw.textlength(text, font=small) <= w - 2 for text in texts):
            for n, text in enumerate(texts):
                r, c = divmod(n, ncols)
                draw.text((c * (w + pad) + 1, top + r * (cell_h + pad)), text, fill=ink, font=small)
            break
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def label_height(frame_height: int) -> int:
    """Pixels of the strip that names a frame in `write_png_grid` (and of each title line): 16 to 32."""
    return max(16, min(32, frame_height // 8))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=max(8, size))


def font_for(text: str, size: int):
    """A font of `size` pixels that has a glyph for every character of `text`: Pillow's own (Latin letters and
    digits only: no accents, Cyrillic or CJK), else the font fontconfig (`fc-match`) names for the characters it
    lacks where that one has them, else Pillow's own (those characters drawn as boxes)."""
    from PIL import ImageFont

    font = _font(size)
    missing = _lacks(font, text)
    if not missing or not shutil.which("fc-match"):
        return font
    charset = " ".join(f"{ord(ch):x}" for ch in missing)
    try:
        path = subprocess.run(["fc-match", "-f", "%{file}", f":charset={charset}"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        other = ImageFont.truetype(path, max(8, size)) if path else None
    except (OSError, subprocess.SubprocessError):
        return font
    # (the other font where it draws more of them: one character no font here has, an emoji say, leaves the others,
    # é or 中, to the font that has them rather than to Pillow's own boxes)
    return other if other is not None and len(_lacks(other, "".join(missing))) < len(missing) else font


def _lacks(font, text: str) -> list[str]:
    """The characters of `text` (spaces aside) that `font` draws as its missing-glyph box, sorted."""
    box = font.getmask("\U0010fffd")  # (a private-use code point: no font has it)
    box = (box.size, bytes(box))
    return sorted(ch for ch in set(text) if not ch.isspace() and ((m := font.getmask(ch)).size, bytes(m)) == box)


def _fit(text: str, font, width: int):
    """`font`, made smaller until `text` fits `width` pixels (8 px at the least)."""
    from PIL import ImageDraw, Image

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while font.size > 8 and draw.textlength(text, font=font) > width:
        font = _font(font.size - 1)
    return font


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels, broken at spaces (a word longer than a line is cut); the third
    line ends in an ellipsis when more would follow."""
    from PIL import ImageDraw, Image

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in text.split():
        while draw.textlength(word, font=font) > width:  # (a word wider than the grid: cut it)
            word = word[:-1]
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > 3:
        third = lines[2]
        while third and draw.textlength(third + " …", font=font) > width:
            third = third[:-1]
        lines = lines[:2] + [third.rstrip() + " …"]
    return lines


def read_prompts(path) -> list[str]:
    """One prompt per line (the researchers' files): strip each line, skip empty ones (with a warning naming them
    when a prompt follows: indices then count prompts, where the researchers' inference.py counts lines). A
    missing file, or one with no prompt in it, is a ModelInputError naming the file. `-` reads standard input, and
    a pipe is read as a file is (`--prompts <(grep circle prompts.txt)`), once."""
    if str(path) == "-":
        path, data = Path("<standard input>"), sys.stdin.buffer.read()
    else:
        path = Path(path)
        if path.is_dir():
            raise ModelInputError(f"prompt file {path} is a folder; give a text file of one prompt per line")
        if not path.exists():
            raise ModelInputError(f"prompt file not found: {path}{relative_note(path)}")
        data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # (a byte order mark, as Windows editors write, is no text)
    except UnicodeDecodeError as e:
        raise ModelInputError(f"prompt file {path} is not UTF-8 text: {e}") from e
    # (lines end at \n, \r\n or \r only, as a text file read line by line: str.splitlines also ends them at a form
    # feed, U+0085, U+2028 ..., which would split one line, and its prompt, in two and move every later index)
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    prompts = [p for p in lines if p]
    if not prompts:
        raise ModelInputError(f"prompt file {path} has no prompts (one prompt per line expected)")
    last = max(i for i, p in enumerate(lines) if p)
    blank = [i + 1 for i in range(last) if not lines[i]]  # (trailing blank lines move no index)
    if blank:
        import warnings

        shown = ", ".join(map(str, blank[:5])) + (f" and {len(blank) - 5} more" if len(blank) > 5 else "")
        warnings.warn(f"prompt file {path}: blank line{'s' if len(blank) > 1 else ''} {shown} skipped, so a prompt's "
                      "index (p<index> in file names, prompt_index in stores) counts prompts, not lines; the "
                      "researchers' inference.py counts lines (a blank line is an empty prompt there)",
                      ModelInputWarning, stacklevel=2)
    return prompts


def read_image(path, height: int, width: int) -> torch.Tensor:
    """An image file as the first frame of an image-to-video run: RGB, resized (bilinear) to height x width
    pixels as the researchers' I2V transform does (stretched, not cropped, to the video's aspect), [3, H, W]
    float32 in [-1, 1]. Its latent is `vae.encode(image[None, :, None])` [1, 1, 16, H/8, W/8]. 16-bit images are
    scaled to 8 bits (PIL's RGB conversion clips them to white); an alpha channel is dropped, another aspect
    ratio stretched and an EXIF orientation not applied (as theirs), each with a warning. A missing or unreadable
    file is a ModelInputError."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise ModelInputError(f"image {str(path)!r} is a folder; give an image file (PNG, JPEG, ...)")
    if not path.is_file():
        raise ModelInputError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            if "A" in img.getbands() or "transparency" in img.info:
                warnings.warn(f"image {str(path)!r}: its transparency is dropped (the colours under it are used)",
                              ModelInputWarning, stacklevel=2)
            if img.getexif().get(0x0112, 1) != 1:  # (EXIF Orientation: how a viewer turns it for display)
                warnings.warn(f"image {str(path)!r}: its EXIF orientation (turned for display) is not applied, as "
                              "the researchers' transform does not; save it turned to use it so", ModelInputWarning,
                              stacklevel=2)
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # 16-bit (or float) grey levels
                grey = np.asarray(img, dtype=np.float64)
                top = (65535.0 if img.mode.startswith("I;16") or grey.max() > 255 else
                       1.0 if img.mode == "F" and grey.max() <= 1 else 255.0)  # ("I": 8-bit values held wide)
                img = Image.fromarray(np.clip(np.rint(grey / top * 255), 0, 255).astype(np.uint8), "L")
            if abs(img.width / img.height - width / height) > 0.02 * width / height:
                warnings.warn(f"image {str(path)!r} is {img.height} x {img.width} (height x width): stretched to the "
                              f"video's {height} x {width} (not cropped, as the researchers' transform)",
                              ModelInputWarning, stacklevel=2)
            rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ModelInputError(f"cannot read image {str(path)!r}: {err}") from None
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)  # [H, W, 3]
    return pixels.permute(2, 0, 1).contiguous()

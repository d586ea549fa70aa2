"""Toy-world metrics: a tracker that reads the one coloured shape of a miniature-world video (models/world.py) back
from decoded pixels, and the scores of a video against what its prompt names. Every metric, with its units, is
defined in docs/world_metrics.md.

How it fits: `workbench evaluate` decodes generated latents with the model's VAE and hands the pixels to
`score_video`; studies/world_report.py turns the per-video results into tables, drift curves and a comparison of
two models. This module needs only numpy (and models.world for the vocabulary and the background's form).

Units: colours are RGB in [0, 1]; positions are pixels, pixel i covering [i, i + 1) (its centre at i + 0.5), as in
`Scene.centre`; time is the pixel-frame index.

The tracker, per video (`track`):
  1. background: the world's background is a gradient between two colours along an angle, clipped at the corners
     (`world.gradient_ramp`). The angle is fitted once, on the per-pixel temporal median; then per frame the two
     colours and a plane (slow drift) by least squares on the pixels that are not the object (three rounds, each
     dropping the pixels whose residual stands out of the noise, widened by 2 px; the first residual is against
     the video's median background, as a fit over every pixel is pulled too far by a large object in a corner).
  2. saliency: per pixel, the residual's energy explained by blending the background towards one vocabulary
     colour: max over colours C of max(0, <r, C - bg>)^2 / |C - bg|^2 (residual r = pixel - background).
  3. a first position: the maximum of the saliency summed over a BOX x BOX (23 x 23) box on the torus.
  4. a window of 2 HALF_WINDOW + 1 = 69 px square about it (indices modulo the frame, so wrap-around costs
     nothing): the object's pixels are the salient ones widened by 2 px; its colour the median of its interior
     (the salient pixels 3 px inside the edge, which a one-pixel edge ramp never reaches); its coverage alpha the
     projection of r onto (colour - bg), clipped to [0, 1]; its centre the alpha-weighted mean of the window's
     offsets (the circular mean on the torus of a compact object), the window then re-centred on it once; its
     area the sum of alpha.
  5. shape: the square and the circle of the same area drawn at that centre (`world.shape_coverage`); the one
     closer to alpha (squared error) wins.
  6. confidence: presence x fit, presence = min(1, area / AREA_REF) (226 px: half the smallest circle the world
     draws), fit = the share of the window's residual energy the one-colour blend explains.
On rendered ground truth the background fit is exact, so alpha is the rendered coverage and the centre is its
centroid: within 0.4 / size px of `Scene.centre` (tests/test_world.py derives the bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models import world

COLOUR_NAMES = tuple(world.COLOURS)
PALETTE = np.array([world.COLOURS[c] for c in COLOUR_NAMES])  # [4, 3] RGB in [0, 1]
SHAPE_NAMES = tuple(world.SHAPES)

HALF_WINDOW = int(world.SIZE_RANGE[1] // 2) + 16  # px: room for the largest object off-centre by 16 px
BOX = int(world.SIZE_RANGE[0]) - 1  # px: the box the first position is found with (a little under the smallest object)
WIDEN = 2  # px: how far the salient pixels are widened (and eroded for the interior)
TAU_MIN = 0.04  # RGB: the smallest residual that counts as the object (noise raises it to 4 sigma)
AREA_REF = 0.5 * np.pi / 4 * world.SIZE_RANGE[0] ** 2  # px: half the area of the smallest circle the world draws
DETECTED = 0.5  # confidence from which a frame counts as showing the object
MIN_SHOWN = 0.5  # share of frames with the object detected from which a video can be adherent (one that loses its
#                  object for most of its length does not show the prompt, however right its few frames are)
MIN_SPEED = 0.25  # px / frame: slower than this is "static" (world.SPEED_RANGE: the objects move faster)
BATCH = 64  # frames tracked at once (bounds memory on long videos)


# ------------------------------------------------------------------------------------------------------ input
def as_frames(video) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3] (numpy, or anything np.asarray reads) -> float64
    [T, H, W, 3] RGB in [0, 1]."""
    v = np.asarray(video)
    if v.dtype == np.uint8:
        if v.ndim != 4 or v.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be [T, H, W, 3], got {v.shape}")
        return v.astype(np.float64) / 255.0
    if not np.issubdtype(v.dtype, np.floating) or v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"a float video must be [3, T, H, W] in [-1, 1] (or uint8 [T, H, W, 3]), got {v.dtype} "
                         f"{v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("the video holds NaN or infinite values")
    return (np.clip(v.astype(np.float64), -1, 1).transpose(1, 2, 3, 0) + 1) / 2


# ---------------------------------------------------------------------------------------------- the tracker
@dataclass
class Track:
    """Per pixel frame: what the tracker reads from a video. NaN (or -1 for names) where nothing is found."""

    centre: np.ndarray  # [T, 2] (y, x) px on the torus, in [0, H) x [0, W)
    area: np.ndarray  # [T] px: the sum of the object's coverage
    colour_rgb: np.ndarray  # [T, 3] RGB in [0, 1]: the median of the object's interior
    colour: np.ndarray  # [T] int: index of the nearest vocabulary colour (COLOUR_NAMES)
    shape: np.ndarray  # [T] int: index into SHAPE_NAMES
    shape_margin: np.ndarray  # [T] in [0, 1]: (e_other - e_best) / (e_other + e_best) of the two templates
    confidence: np.ndarray  # [T] in [0, 1]: presence x fit (module docstring)
    background_change: np.ndarray  # [T] RGB: RMS change of the background from the frame before (0 at t = 0)
    background_residual: np.ndarray  # [T] RGB: RMS of the background fit's residual off the object
    size: tuple[int, int]  # (H, W) px

    @property
    def detected(self) -> np.ndarray:
        return self.confidence >= DETECTED

    def colour_names(self) -> list[str]:
        return [COLOUR_NAMES[i] if i >= 0 else "" for i in self.colour]

    def shape_names(self) -> list[str]:
        return [SHAPE_NAMES[i] if i >= 0 else "" for i in self.shape]


def track(video) -> Track:
    """Find the object in every frame of a video (module docstring); video as `as_frames` takes it."""
    frames = as_frames(video)  # [T, H, W, 3]
    T, H, W, _ = frames.shape
    if H < 2 * HALF_WINDOW + 1 or W < 2 * HALF_WINDOW + 1:
        raise ValueError(f"frames of {H} x {W} px are smaller than the tracker's window ({2 * HALF_WINDOW + 1} px)")
    step = max(1, T // 64)
    median = np.median(frames[::step], axis=0)  # [H, W, 3]: the static background, the moving object mostly gone
    angle = _fit_angle(median)
    design = _design(angle, H, W)  # [H * W, 4]
    background = _background_fit(median[None], design, None)[0][0]  # [H, W, 3]: where each frame's fit starts
    parts, prev = [], None
    for start in range(0, T, BATCH):
        part, prev = _track_batch(frames[start : start + BATCH], design, prev, background)
        parts.append(part)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Track(size=(H, W), **out)


def _design(angle: float, H: int, W: int) -> np.ndarray:
    """[H * W, 4] the background's basis: the two colours' weights (1 - ramp, ramp) and a plane (y, x)."""
    ramp = world.gradient_ramp(angle, H, W).ravel()
    ys, xs = np.meshgrid(np.linspace(-0.5, 0.5, H), np.linspace(-0.5, 0.5, W), indexing="ij")
    return np.stack([1 - ramp, ramp, ys.ravel(), xs.ravel()], axis=1)


def _solve(design: np.ndarray, weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Weighted least squares per frame: design [N, k], weights [B, N], values [B, N, 3] -> fitted [B, N, 3].
    A tiny ridge keeps it defined when the basis is degenerate (an axis-aligned gradient is itself a plane).
    Written as three matrix products over all frames at once (one BLAS call each)."""
    (N, k), B = design.shape, weights.shape[0]
    outer = (design[:, :, None] * design[:, None, :]).reshape(N, k * k)
    xtx = (weights @ outer).reshape(B, k, k)
    xty = (design.T @ (weights[:, :, None] * values).transpose(1, 0, 2).reshape(N, B * 3)).reshape(k, B, 3)
    ridge = (1e-10 * np.trace(xtx, axis1=1, axis2=2) + 1e-300)[:, None, None] * np.eye(k)
    beta = np.linalg.solve(xtx + ridge, xty.transpose(1, 0, 2))  # [B, k, 3]
    return (design @ beta.transpose(1, 0, 2).reshape(k, B * 3)).reshape(N, B, 3).transpose(1, 0, 2)


def _fit_angle(image: np.ndarray) -> float:
    """The background gradient's angle in [0, pi) (the ramp at angle + pi is 1 - ramp: the same family) that fits
    `image` [H, W, 3] best with two colours, ignoring pixels that stand out of the fit (the object): a 3-degree grid,
    a golden-section search about its best, then again without the pixels that stood out."""
    H, W, _ = image.shape
    values = image.reshape(-1, 3)
    keep = np.ones(H * W, bool)

    def sse(angle):  # the residual of values ~ p + q ramp per channel over the kept pixels, less a constant
        ramp = world.gradient_ramp(angle, H, W).ravel()[keep]
        rc = ramp - ramp.mean()
        return -float(((rc @ centred) ** 2).sum() / max(rc @ rc, 1e-300))

    centred = values - values.mean(0)
    grid = np.linspace(0, np.pi, 60, endpoint=False)
    best = grid[int(np.argmin([sse(a) for a in grid]))]
    for _ in range(2):  # fit, drop what stands out, fit again
        centred = values[keep] - values[keep].mean(0)
        best = _golden(sse, best - np.pi / 60, best + np.pi / 60)
        resid = np.abs(_solve(_design(best, H, W), keep[None].astype(np.float64), values[None])[0] - values).max(-1)
        tau = max(TAU_MIN, 4 * _sigma(resid.reshape(1, H, W), keep.reshape(1, H, W))[0])
        keep = ~_widen((resid > tau).reshape(1, H, W), WIDEN).ravel()
    return float(best % np.pi)


def _golden(f, lo: float, hi: float, iterations: int = 40) -> float:
    """The minimum of f in [lo, hi] by golden-section search (f unimodal there)."""
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


def _sigma(resid: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[B] robust noise level of residual magnitudes [B, H, W] over the kept pixels (1.4826 x median absolute)."""
    return np.array([1.4826 * np.median(r[k]) if k.any() else 0.0 for r, k in zip(resid, keep)])


def _widen(mask: np.ndarray, px: int) -> np.ndarray:
    """[B, H, W] bool: the mask dilated by a (2 px + 1) square on the torus."""
    out = mask.copy()
    for axis in (1, 2):
        grown = out.copy()
        for shift in range(1, px + 1):
            grown |= np.roll(out, shift, axis) | np.roll(out, -shift, axis)
        out = grown
    return out


def _box_mean3(x: np.ndarray) -> np.ndarray:
    """[B, H, W, C]: the mean over each pixel's 3 x 3 neighbourhood, on the torus."""
    rows = x + np.roll(x, 1, 1) + np.roll(x, -1, 1)
    return (rows + np.roll(rows, 1, 2) + np.roll(rows, -1, 2)) / 9


def _box_sum(x: np.ndarray, size: int) -> np.ndarray:
    """[B, H, W]: the sum of x over a size x size box centred on each pixel, on the torus (via the FFT)."""
    B, H, W = x.shape
    kernel = np.zeros((H, W))
    r = size // 2
    idx_y, idx_x = np.arange(-r, r + 1) % H, np.arange(-r, r + 1) % W
    kernel[np.ix_(idx_y, idx_x)] = 1.0
    return np.fft.irfft2(np.fft.rfft2(x) * np.fft.rfft2(kernel), s=(H, W))


def _background_fit(frames: np.ndarray, design: np.ndarray, start: np.ndarray | None, rounds: int = 3):
    """Each frame's background [B, H, W, 3], the gradient fitted on what is not the object, which is found from the
    residual of the fit before: (bg, resid, smooth residual, tau [B], keep [B, H * W]) of the last round. The first
    residual is against `start` [H, W, 3] when given (the video's median background: a fit over every pixel is
    pulled so far by a large object in a corner that the noise level of its residual hides the object), else
    against a fit over every pixel."""
    B, H, W, _ = frames.shape
    values = frames.reshape(B, H * W, 3)
    bg = None if start is None else np.broadcast_to(start, frames.shape)
    keep = np.ones((B, H * W))
    for i in range(rounds + (start is not None)):
        if i or start is None:
            bg = _solve(design, keep, values).reshape(B, H, W, 3)
        resid = frames - bg  # [B, H, W, 3]
        smooth = _box_mean3(resid)  # 3 x 3 mean: a third of the noise, edges 1 px wider
        mag = np.abs(smooth).max(-1)
        tau = np.maximum(TAU_MIN, 4 * _sigma(mag, keep.reshape(B, H, W) > 0))  # [B]
        outlier = _widen(mag > tau[:, None, None], WIDEN)
        keep = (~outlier).reshape(B, -1).astype(np.float64)
    return bg, resid, smooth, tau, keep


def _track_batch(frames: np.ndarray, design: np.ndarray, prev, background: np.ndarray):
    B, H, W, _ = frames.shape
    # the background, fitted on what is not the object; the object found from its residual
    bg, resid, smooth, tau, keep = _background_fit(frames, design, background)

    # <r, C - bg> and |C - bg|^2 for each vocabulary colour C, without a [B, H, W, 4, 3] array
    flat_r, flat_bg = smooth.reshape(-1, 3), bg.reshape(-1, 3)
    dot = (flat_r @ PALETTE.T - (flat_r * flat_bg).sum(-1, keepdims=True)).reshape(B, H, W, -1)  # [B, H, W, 4]
    dist2 = ((PALETTE ** 2).sum(-1) - 2 * flat_bg @ PALETTE.T + (flat_bg ** 2).sum(-1, keepdims=True)).reshape(dot.shape)
    # (a background equal to a vocabulary colour explains nothing of it: 0, not 0 / 0)
    explained = np.divide(np.maximum(dot, 0) ** 2, dist2, out=np.zeros_like(dot), where=dist2 > 0).max(-1)  # [B, H, W]
    salient = explained > tau[:, None, None] ** 2
    mask = _widen(salient, WIDEN)
    interior = ~_widen(~salient, WIDEN + 1)  # 3 px in: past the edge ramp, and the 1 px the smoothing adds
    y0, x0 = np.unravel_index(np.argmax(_box_sum(salient * explained, BOX).reshape(B, -1), axis=1), (H, W))

    for _ in range(2):  # measure in a window about the first position, then about the centre found
        win = _window(y0, x0, H, W)
        m = mask[win]  # [B, n, n]
        colour_rgb = _object_colour(frames[win], interior[win], m, explained[win])  # [B, 3]
        cd = colour_rgb[:, None, None] - bg[win]  # [B, n, n, 3]
        r = resid[win]
        alpha = np.where(m, np.clip((r * cd).sum(-1) / np.maximum((cd * cd).sum(-1), 1e-12), 0, 1), 0.0)
        alpha = np.nan_to_num(alpha)
        area = alpha.sum((1, 2))
        offsets = np.arange(-HALF_WINDOW, HALF_WINDOW + 1) + 0.5
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = y0 + (alpha.sum(2) * offsets).sum(1) / area
            cx = x0 + (alpha.sum(1) * offsets).sum(1) / area
        found = area > 0
        wy, wx = y0, x0  # the window alpha was measured in
        y0 = np.where(found, np.floor(np.nan_to_num(cy)), y0).astype(int) % H
        x0 = np.where(found, np.floor(np.nan_to_num(cx)), x0).astype(int) % W

    # shape: the template of each shape with the object's area, at its centre
    dy = (wy[:, None] + offsets[None] - cy[:, None])[:, :, None]  # [B, n, 1]
    dx = (wx[:, None] + offsets[None] - cx[:, None])[:, None, :]  # [B, 1, n]
    sizes = {"square": np.sqrt(area), "circle": np.sqrt(4 * area / np.pi)}
    err = np.stack([((alpha - world.shape_coverage(s, sizes[s][:, None, None], dy, dx)) ** 2).sum((1, 2))
                    for s in SHAPE_NAMES], axis=1)  # [B, 2]
    shape = np.where(found, np.argmin(err, axis=1), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.abs(err[:, 0] - err[:, 1]) / (err[:, 0] + err[:, 1])
        unexplained = ((r - alpha[..., None] * cd) ** 2).sum((1, 2, 3))
        fit = np.clip(1 - unexplained / (r * r).sum((1, 2, 3)), 0, 1)
    confidence = np.where(found, np.minimum(1, area / AREA_REF) * np.nan_to_num(fit), 0.0)
    colour = np.where(np.isfinite(colour_rgb).all(1),
                      np.argmin(((np.nan_to_num(colour_rgb)[:, None] - PALETTE[None]) ** 2).sum(-1), axis=1), -1)

    # the background's change from the frame before, away from the object in either frame
    prev_frames = np.concatenate([prev[0][None] if prev else frames[:1], frames[:-1]])
    prev_mask = np.concatenate([prev[1][None] if prev else mask[:1], mask[:-1]])
    still = ~(mask | prev_mask)
    change = np.sqrt(np.where(still, ((frames - prev_frames) ** 2).sum(-1), 0).sum((1, 2))
                     / np.maximum(3 * still.sum((1, 2)), 1))
    off = keep.reshape(B, H, W)
    bg_resid = np.sqrt(((resid ** 2).sum(-1) * off).sum((1, 2)) / np.maximum(3 * off.sum((1, 2)), 1))
    centre = np.stack([np.where(found, cy % H, np.nan), np.where(found, cx % W, np.nan)], axis=1)
    part = dict(centre=centre, area=area, colour_rgb=colour_rgb, colour=colour, shape=shape,
                shape_margin=np.where(found, margin, np.nan), confidence=confidence, background_change=change,
                background_residual=bg_resid)
    return part, (frames[-1], mask[-1])


def _window(y0, x0, H, W):
    """Index arrays that cut a (2 HALF_WINDOW + 1)^2 window about (y0, x0) [B] out of [B, H, W, ...], wrapping."""
    o = np.arange(-HALF_WINDOW, HALF_WINDOW + 1)
    b = np.arange(len(y0))[:, None, None]
    return b, ((y0[:, None] + o) % H)[:, :, None], ((x0[:, None] + o) % W)[:, None, :]


def _object_colour(pixels, interior, mask, score) -> np.ndarray:
    """[B, 3] the median colour of the object's interior pixels; where a frame has none (a tiny or blurred
    object), of the quarter of its pixels the vocabulary explains best; NaN where nothing stands out."""
    out = np.full((pixels.shape[0], 3), np.nan)
    for i in range(pixels.shape[0]):
        pick = interior[i]
        if not pick.any() and mask[i].any():
            s = np.where(mask[i], score[i], -np.inf)
            pick = s >= np.quantile(s[mask[i]], 0.75)
        if pick.any():
            out[i] = np.median(pixels[i][pick], axis=0)
    return out


# --------------------------------------------------------------------------------------------- the metrics
# Per-video numbers (docs/world_metrics.md), in table order, with their units.
NUMBERS = {
    "adherent": "0/1", "colour_ok": "0/1", "shape_ok": "0/1", "direction_ok": "0/1", "detected": "fraction",
    "confidence": "0-1", "trajectory_error": "px", "speed": "px/frame", "colour_error": "RGB", "area": "px",
    "area_change": "fraction/frame", "colour_change": "RGB/frame", "background_change": "RGB/frame",
    "background_misfit": "RGB", "jitter": "px/frame^2", "confidence_drift": "0-1", "colour_drift": "RGB",
    "trajectory_drift": "px",
}


def mean_unit(name: str, share: str = "share") -> str:
    """The unit of number `name` averaged over videos: a 0/1 check's mean is the `share` of them that pass."""
    return share if NUMBERS[name] == "0/1" else NUMBERS[name]
# Per-frame curves: what drifts over a long rollout.
CURVES = {"confidence": "0-1", "colour_error": "RGB", "trajectory_error": "px", "area_change": "fraction",
          "colour_change": "RGB", "background_change": "RGB"}


@dataclass
class VideoScore:
    """How one video matches its prompt: the named and the found vocabulary, numbers and per-frame curves."""

    prompt: str
    named: tuple[str, str, str]  # (colour, shape, direction) the prompt names
    found: tuple[str, str, str]  # the majority colour and shape over detected frames, the fitted direction
    numbers: dict[str, float]  # NUMBERS
    curves: dict[str, np.ndarray] = field(repr=False)  # CURVES, each [T]; NaN where the object was not detected

    def row(self) -> dict:
        """A flat dict for a table: prompt, named_*, found_*, then the numbers."""
        out = {"prompt": self.prompt}
        for kind, values in (("named", self.named), ("found", self.found)):
            out.update({f"{kind}_{k}": v for k, v in zip(("colour", "shape", "direction"), values)})
        return out | self.numbers

    def to_json(self) -> dict:
        """A JSON-ready dict (NaN as null), read back exactly by `from_json` (workbench/scores.py keeps these)."""
        def plain(v):
            return None if v != v else float(v)  # NaN -> null

        return dict(prompt=self.prompt, named=list(self.named), found=list(self.found),
                    numbers={k: plain(v) for k, v in self.numbers.items()},
                    curves={k: [plain(x) for x in np.asarray(c, dtype=np.float64)] for k, c in self.curves.items()})

    @classmethod
    def from_json(cls, d: dict) -> VideoScore:
        def num(v):
            return np.nan if v is None else float(v)

        return cls(d["prompt"], tuple(d["named"]), tuple(d["found"]), {k: num(v) for k, v in d["numbers"].items()},
                   {k: np.array([num(x) for x in c], dtype=np.float64) for k, c in d["curves"].items()})


def score_rollout_video(video, prompt: str) -> VideoScore:
    """`score_video` of a decoded rollout, except that one holding NaN or inf (a rollout that diverged: its
    activations overflowed) is scored as a blank video, in which the tracker finds nothing (adherent 0, detected 0,
    its errors NaN). `workbench intervene` and `workbench evaluate` score videos so and say which diverged."""
    v = np.asarray(video)
    if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
        return score_video(np.zeros_like(v), prompt)
    return score_video(video, prompt)


def score_video(video, prompt: str) -> VideoScore:
    """Track a video (or take a `Track`) and score it against the prompt (`world.parse_prompt` reads it)."""
    named = world.parse_prompt(prompt)
    tr = video if isinstance(video, Track) else track(video)
    colour, shape, direction = named
    T = len(tr.confidence)
    t = np.arange(T, dtype=np.float64)
    det = tr.detected
    n_det = int(det.sum())

    found_colour = _mode([COLOUR_NAMES[i] for i in tr.colour[det]])
    found_shape = _mode([SHAPE_NAMES[i] for i in tr.shape[det]])
    u = unwrap(tr.centre, det, tr.size)  # [T, 2] unwrapped px, NaN where not detected
    velocity = _line_fit(t[det], u[det])[1] if n_det >= 2 else np.full(2, np.nan)
    found_direction = direction_of(velocity)
    fitted, speed = fit_named_motion(t, u, det, direction)

    with np.errstate(invalid="ignore"):
        traj = np.where(det, np.linalg.norm(u - fitted, axis=1), np.nan)  # along the path: not wrapped
        colour_err = np.where(det, np.linalg.norm(tr.colour_rgb - np.asarray(world.COLOURS[colour]), axis=1), np.nan)
        both = det & np.roll(det, 1)
        both[0] = False
        area_ref = np.median(tr.area[det]) if n_det else np.nan
        area_change = np.where(both, np.abs(np.diff(tr.area, prepend=np.nan)) / area_ref, np.nan)
        colour_change = np.where(both, np.linalg.norm(np.diff(tr.colour_rgb, axis=0, prepend=np.nan), axis=1), np.nan)
        bg_change = tr.background_change.copy()
        bg_change[0] = np.nan
        second = u[2:] - 2 * u[1:-1] + u[:-2]  # NaN unless three detected frames in a row
        jitter = np.sqrt(np.nanmean((second ** 2).sum(1))) if np.isfinite(second).all(1).any() else np.nan
    curves = dict(confidence=tr.confidence.copy(), colour_error=colour_err, trajectory_error=traj,
                  area_change=area_change, colour_change=colour_change, background_change=bg_change)

    ok = dict(colour_ok=found_colour == colour, shape_ok=found_shape == shape, direction_ok=found_direction == direction)
    numbers = dict(
        adherent=float(all(ok.values()) and n_det / T >= MIN_SHOWN), **{k: float(v) for k, v in ok.items()},
        detected=n_det / T,
        confidence=float(tr.confidence.mean()), trajectory_error=_rms(traj), speed=speed,
        colour_error=_nanmean(colour_err), area=float(area_ref), area_change=_nanmean(area_change),
        colour_change=_nanmean(colour_change), background_change=_nanmean(bg_change),
        background_misfit=float(tr.background_residual.mean()), jitter=float(jitter),
        confidence_drift=drift(tr.confidence), colour_drift=drift(colour_err), trajectory_drift=drift(traj))
    return VideoScore(prompt, named, (found_colour, found_shape, found_direction), numbers, curves)


def unwrap(centre: np.ndarray, detected: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[T, 2] positions on the torus -> a continuous path (each step between detected frames taken the short way
    round); NaN where not detected."""
    out = np.full(centre.shape, np.nan)
    idx = np.flatnonzero(detected)
    if len(idx):
        steps = _wrap(np.diff(centre[idx], axis=0), size)
        out[idx] = centre[idx[0]] + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return out


def direction_of(velocity: np.ndarray) -> str:
    """The vocabulary direction closest to a velocity (dy, dx) px/frame; "static" below MIN_SPEED (or unknown)."""
    if not np.isfinite(velocity).all() or np.linalg.norm(velocity) < MIN_SPEED:
        return "static"
    names = list(world.DIRECTIONS)
    return names[int(np.argmax([np.dot(velocity, world.DIRECTIONS[n]) for n in names]))]


def fit_named_motion(t, u, detected, direction: str, fit_frames: int = world.NUM_FRAMES) -> tuple[np.ndarray, float]:
    """The named motion that best fits the path u [T, 2] over its first `fit_frames` frames (the length the models
    are trained on; later frames are extrapolated, so a long rollout's error accumulates): a start and a speed >= 0
    along the named axis, nothing across it, by least squares over the detected frames. Returns (the fitted path
    [T, 2], speed px/frame)."""
    use = detected & (t < fit_frames)
    if use.sum() < 2:
        use = detected
    if use.sum() < 2:
        return np.full(u.shape, np.nan), float("nan")
    e = np.asarray(world.DIRECTIONS[direction])  # unit (dy, dx)
    across_axis = np.abs(e[::-1])
    along, across = u[use] @ e, u[use] @ across_axis
    a, s = _line_fit(t[use], along[:, None])[:, 0]
    if s < 0:  # moving the other way (or not at all) is no speed along the named direction
        a, s = along.mean(), 0.0
    fitted = np.outer(a + s * t, e) + np.outer(np.full_like(t, across.mean()), across_axis)
    return fitted, float(s)


def drift(curve: np.ndarray) -> float:
    """Mean over the last quarter of the frames minus mean over the first quarter (NaN frames left out)."""
    q = max(1, len(curve) // 4)
    return _nanmean(curve[-q:]) - _nanmean(curve[:q])


def _line_fit(t: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares y = a + b t for each column of y [n, k] -> [[a...], [b...]] ([2, k])."""
    X = np.stack([np.ones_like(t), t], axis=1)
    return np.linalg.lstsq(X, y, rcond=None)[0]


def _wrap(d: np.ndarray, size) -> np.ndarray:
    """Displacements [.., 2] taken the short way round the torus: into [-H/2, H/2) x [-W/2, W/2)."""
    n = np.asarray(size, dtype=np.float64)
    return (d + n / 2) % n - n / 2


def _mode(names: list[str]) -> str:
    if not names:
        return "none"
    values, counts = np.unique(names, return_counts=True)
    return str(values[int(np.argmax(counts))])


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _rms(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.nanmean(x ** 2))) if np.isfinite(x).any() else float("nan")

"""The miniature world: procedurally rendered videos of one coloured shape moving the way its prompt says.

How it fits: the embedded models (`data/embedded/`) are trained on these videos (the VAE on the pixels, the
DiTs on their VAE latents), and `studies/world_metrics.py` scores generated videos against what the prompt names.
The module needs only numpy, so studies can import it without torch.

A video is a pure function of (prompt, seed):

    vocabulary   colours red, green, blue, yellow; shapes square, circle; directions left, right, up, down
    prompt       "a red square moving left" (`prompt_for`); `parse_prompt` also reads the longer phrasings of
                 `TEMPLATES` and any sentence naming exactly one colour, one shape and one direction
    scene        a static background (a smooth gradient between two muted colours), one object of side / diameter
                 `size` px (24-36, `SIZE_RANGE`: 3-4.5 latent cells) whose centre moves `speed` px per pixel frame
                 (1.2-2.0, `SPEED_RANGE`: 0.6-1 latent cell per latent frame) in the named direction from
                 `start` (near the centre), wrapping around the frame's edges (a torus), so a video of any
                 length keeps its motion
    pixels       float32 [3, T, H, W] in [-1, 1], the VAE's input range; edges anti-aliased by coverage
    geometry     81 pixel frames = 21 latent frames (the Wan VAE's 4x temporal stride with a causal first frame),
                 96 x 128 pixels = 12 x 16 latents (8x spatial stride)

`Scene.centre(t)` is the ground-truth trajectory: the object's centre (y, x) in pixels at pixel frame t, unwrapped
(it keeps growing past the edge); `% (height, width)` gives the drawn position.

`VERSION` numbers the rendering: version 1 drew 16-26 px objects moving 0.8-1.4 px per frame (the first zoo models
were trained on it), version 2 the sizes and speeds above from a start anywhere in the frame, version 3 the same
from a start within `START_JITTER` px of the frame's centre. training/world_data.py keys its cached latent sets by
it, so a set drawn by another version is made again rather than reused.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

COLOURS = {  # RGB in [0, 1], saturated so that they stand apart from the muted background
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)
TEMPLATES = (
    "a {colour} {shape} moving {direction}",
    "a {colour} {shape} slides {direction}",
    "the {colour} {shape} moves {direction} across the frame",
)
NUM_FRAMES, HEIGHT, WIDTH = 81, 96, 128
# Objects span 3-4.5 latent cells and move 0.6-1 cell per latent frame: smaller or slower ones left the
# shape to a few sub-cell details the VAE blurs (ground truth through the first world VAE read back as the
# wrong shape 16% of the time) and the direction to a fraction of a cell per latent frame, a weak signal that
# the first DiTs learned far more slowly than colour (docs/zoo.md).
SIZE_RANGE = (24.0, 36.0)  # px, side of a square / diameter of a circle
SPEED_RANGE = (1.2, 2.0)  # px per pixel frame
# Objects start near the frame's centre (within START_JITTER px on each axis): from a start anywhere on the torus
# every single frame would look alike whatever the direction (only the frames' order would tell), and the DiTs
# trained on that world used the colour word but not the direction word (docs/zoo.md). From the centre, each frame
# already shows which way the object went, as each frame shows its colour.
START_JITTER = 12.0  # px
VERSION = 3  # of the world's rendering: cached latent sets of another version are not reused (training/world_data.py)
BACKGROUND_RANGE = (0.10, 0.40)  # each RGB channel of the two background colours, in [0, 1]


@dataclass(frozen=True)
class Scene:
    """Everything a video shows; `render` draws it."""

    colour: str
    shape: str
    direction: str
    size: float  # px
    speed: float  # px per pixel frame
    start: tuple[float, float]  # (y, x) centre at frame 0, px
    background: tuple[tuple[float, float, float], tuple[float, float, float]]  # top-left and bottom-right RGB
    background_angle: float  # radians: the gradient's direction

    @property
    def prompt(self) -> str:
        return prompt_for(self.colour, self.shape, self.direction)

    def centre(self, t) -> np.ndarray:
        """[len(t), 2] float64: the unwrapped centre (y, x) in px at pixel frames t."""
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
        step = np.asarray(DIRECTIONS[self.direction]) * self.speed  # [2] px per frame
        return np.asarray(self.start) + t * step


def prompt_for(colour: str, shape: str, direction: str, template: int = 0) -> str:
    for name, value, allowed in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                                 ("direction", direction, DIRECTIONS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; the world knows {', '.join(allowed)}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template {template!r}: the world has templates 0-{len(TEMPLATES) - 1}")
    return TEMPLATES[template].format(colour=colour, shape=shape, direction=direction)


def prompt_grid(template: int = 0) -> list[str]:
    """Every colour x shape x direction, in vocabulary order (32 prompts)."""
    return [prompt_for(c, s, d, template) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


# words that say the object does not move the named way, or is still: such a prompt names no video of the world.
# Not where they say it keeps moving: "still" before a motion word ("still moving left"), a negation before a stop
# word ("without stopping", "never stops")
NEGATORS = ("not", "no", "never", "nor", "without", "isn", "doesn", "don", "won", "cannot")
STOP_WORDS = ("stop", "stops", "stopped", "stopping", "pause", "pauses", "paused", "pausing", "halt", "halts",
              "halted", "halting")
NEGATIONS = NEGATORS + STOP_WORDS + ("still", "static", "stationary", "motionless")
MOTION_WORDS = ("moving", "moves", "move", "slides", "sliding", "slide", "going", "goes", "heading", "heads",
                "travelling", "traveling", "travels", "drifting", "drifts", "gliding", "glides")


def _negations(words: list[str]) -> list[str]:
    """The words of `NEGATIONS` that say the object does not move (see there)."""
    words = [w for w in words if w != "t"]  # ("doesn't" reads as doesn, t)
    found, skip = [], False
    for i, w in enumerate(words):
        after = words[i + 1] if i + 1 < len(words) else ""
        if skip:  # (the stop word a negation before it turned round)
            skip = False
        elif w == "still" and after in MOTION_WORDS:
            continue
        elif w in NEGATORS and after in STOP_WORDS:
            skip = True
        elif w in NEGATIONS:
            found.append(w)
    return found


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, direction) named by a prompt; ValueError unless it names exactly one of each, each once
    (a colour or shape named twice is two objects), and says nothing against the motion (`NEGATIONS`: "not
    moving left" was read as moving left)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    found, wrong = [], []
    for name, vocab in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        hits = sorted({w for w in words if w in vocab})
        found.append(hits[0] if hits else None)
        if len(hits) != 1:
            wrong.append(f"{len(hits)} {name}s {hits}; the world needs exactly one of {', '.join(vocab)}")
        elif words.count(hits[0]) > 1 and name != "direction":
            wrong.append(f"the {name} {hits[0]!r} {words.count(hits[0])} times; the world has one object")
    negated = _negations(words)
    if negated:
        wrong.append(f"a negation or no motion ({negated[0]!r}); the world's videos are one object moving the way "
                     "its prompt names")
    if wrong:
        raise ValueError(f"prompt {prompt!r} names " + "; and ".join(wrong))
    return found[0], found[1], found[2]


def scene_for(prompt: str, seed: int, height: int = HEIGHT, width: int = WIDTH) -> Scene:
    """The scene of (prompt, seed): the prompt fixes colour, shape and direction; the seed draws the rest."""
    colour, shape, direction = parse_prompt(prompt)
    rng = np.random.default_rng([int(seed), 0x5F0C])
    size = float(rng.uniform(*SIZE_RANGE))
    speed = float(rng.uniform(*SPEED_RANGE))
    start = (float(height / 2 + rng.uniform(-START_JITTER, START_JITTER)),
             float(width / 2 + rng.uniform(-START_JITTER, START_JITTER)))
    bg = rng.uniform(*BACKGROUND_RANGE, size=(2, 3))
    angle = float(rng.uniform(0, 2 * np.pi))
    return Scene(colour, shape, direction, size, speed, start,
                 (tuple(map(float, bg[0])), tuple(map(float, bg[1]))), angle)


def gradient_ramp(angle: float, height: int, width: int) -> np.ndarray:
    """[H, W] float64 in [0, 1]: how far along the background gradient each pixel lies (0: first colour, 1: second),
    a plane through the frame's centre at `angle` (radians), clipped at the corners."""
    ys, xs = np.meshgrid(np.linspace(-0.5, 0.5, height), np.linspace(-0.5, 0.5, width), indexing="ij")
    return np.clip(0.5 + ys * np.sin(angle) + xs * np.cos(angle), 0, 1)


def background(scene: Scene, height: int, width: int) -> np.ndarray:
    """[H, W, 3] float64 in [0, 1]: a linear gradient between the scene's two colours along its angle."""
    a = gradient_ramp(scene.background_angle, height, width)[..., None]
    c0, c1 = np.asarray(scene.background[0]), np.asarray(scene.background[1])
    return (1 - a) * c0 + a * c1


def shape_coverage(shape: str, size: float, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """How much of each pixel a `shape` of side / diameter `size` px covers, from the distances (dy, dx) in px of
    the pixels' centres to the shape's centre: 1 inside, 0 outside, a one-pixel linear ramp on the edge (for the
    square, along each axis the exact area of the pixel inside the shape)."""
    if shape == "square":
        signed = np.maximum(np.abs(dy), np.abs(dx)) - size / 2
    elif shape == "circle":
        signed = np.sqrt(dy ** 2 + dx ** 2) - size / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; the world knows {', '.join(SHAPES)}")
    return np.clip(0.5 - signed, 0.0, 1.0)


def coverage(scene: Scene, centre: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W] float64 in [0, 1]: how much of each pixel the object covers, drawn at `centre` (y, x) on the torus."""
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5  # pixel centres
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    cy, cx = centre[0] % height, centre[1] % width
    dy = (ys - cy + height / 2) % height - height / 2  # toroidal offsets from the centre
    dx = (xs - cx + width / 2) % width - width / 2
    return shape_coverage(scene.shape, scene.size, dy, dx)


def render(scene: Scene, num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH,
           first_frame: int = 0) -> np.ndarray:
    """float32 [3, T, H, W] in [-1, 1]: pixel frames first_frame .. first_frame + num_frames - 1 of the scene."""
    bg = background(scene, height, width)  # [H, W, 3]
    colour = np.asarray(COLOURS[scene.colour])
    centres = scene.centre(np.arange(first_frame, first_frame + num_frames))
    frames = np.empty((num_frames, height, width, 3), dtype=np.float64)
    for i, c in enumerate(centres):
        a = coverage(scene, c, height, width)[..., None]
        frames[i] = (1 - a) * bg + a * colour
    return (frames.transpose(3, 0, 1, 2) * 2 - 1).astype(np.float32)


def world_video(prompt: str, seed: int, num_frames: int = NUM_FRAMES, height: int = HEIGHT,
                width: int = WIDTH) -> tuple[np.ndarray, Scene]:
    """(pixels [3, T, H, W] in [-1, 1], scene) for a prompt and a seed."""
    scene = scene_for(prompt, seed, height, width)
    return render(scene, num_frames, height, width), scene


def dataset_item(index: int, seed: int = 0, template_mix: bool = True) -> tuple[str, int]:
    """(prompt, scene seed) of item `index` of a training set: prompts cycle through the grid (every phrasing when
    template_mix), each item gets its own scene seed."""
    grid = [p for t in (range(len(TEMPLATES)) if template_mix else [0]) for p in prompt_grid(t)]
    rng = np.random.default_rng([int(seed), int(index), 0xDA7A])
    return grid[int(rng.integers(len(grid)))], int(rng.integers(2 ** 31))

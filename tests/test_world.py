"""models/world.py: a video is a pure function of (prompt, seed); the prompt grammar and its errors; the video's
geometry; the drawn object sits exactly on `Scene.centre` (on the torus), including while it wraps across an edge.

The centroid tolerance. The object is symmetric about its centre, so the coverage-weighted centroid of its pixels
differs from the centre only through the sampling of its one-pixel edge ramp. For the square, along each axis the
ramp is the exact area of each pixel inside the shape, so a row's centroid is off by [b(1 - b) - a(1 - a)] / 2 / s
(a, b: the two partially covered end pixels), at most 1 / (8 s); the four corner pixels take min(a, b) instead of
the area a b, at most 1/4 more each at most s/2 + 1/2 from the centre, adding at most (1 + 1/s) / (4 s). Together
CENTROID_TOL = 0.4 / size px (0.017 px at the smallest size, 24 px). The circle's edge ramp is sampled the same way;
its measured worst case over a 17 x 17 grid of sub-pixel positions is 0.15 / size (the square's 0.19 / size).
"""

import numpy as np
import pytest

from models import world

H, W = world.HEIGHT, world.WIDTH


def centroid_tol(scene):
    return 0.4 / scene.size


def alpha_from_pixels(video, scene):
    """[T, H, W] the object's coverage read back from rendered pixels: the blend (1 - a) bg + a colour, inverted."""
    frames = (video.astype(np.float64).transpose(1, 2, 3, 0) + 1) / 2  # [T, H, W, 3] in [0, 1]
    bg = world.background(scene, H, W)  # [H, W, 3]
    d = np.asarray(world.COLOURS[scene.colour]) - bg
    return ((frames - bg) * d).sum(-1) / (d * d).sum(-1)


def torus_centroid(a):
    """(y, x) centroid of a [H, W] weight map on the torus: the circular mean of each axis for a first guess, then
    the weighted mean of the offsets unwrapped about it (exact for a compact object, unlike the angle mean)."""
    out = []
    for axis, n in ((0, a.shape[0]), (1, a.shape[1])):
        pos = np.arange(n) + 0.5
        marginal = a.sum(axis=1 - axis)
        angle = np.angle((marginal * np.exp(2j * np.pi * pos / n)).sum())
        guess = angle / (2 * np.pi) * n
        offsets = (pos - guess + n / 2) % n - n / 2
        out.append((guess + (marginal * offsets).sum() / marginal.sum()) % n)
    return np.array(out)


def torus_diff(a, b):
    return (np.asarray(a) - np.asarray(b) + np.array([H, W]) / 2) % np.array([H, W]) - np.array([H, W]) / 2


# ---------------------------------------------------------------------------------------------------- grammar
def test_every_template_parses_back():
    for template in range(len(world.TEMPLATES)):
        grid = world.prompt_grid(template)
        assert len(grid) == len(set(grid)) == 4 * 2 * 4
        for prompt in grid:
            c, s, d = world.parse_prompt(prompt)
            assert world.prompt_for(c, s, d, template) == prompt
    assert world.parse_prompt("A Blue CIRCLE, moving up!") == ("blue", "circle", "up")
    assert world.parse_prompt("up goes the yellow square") == ("yellow", "square", "up")
    for moving in ("a red square still moving left", "a red square moving left without stopping",
                   "a red square moving left, never stopping", "a red square moving left that doesn't stop",
                   "a red square moving left, does not stop"):  # (not negations: it keeps moving)
        assert world.parse_prompt(moving) == ("red", "square", "left")


@pytest.mark.parametrize("prompt, needle", [
    ("a square moving left", "0 colours"),
    ("a red blue square moving left", "2 colours"),
    ("a red triangle moving left", "0 shapes"),
    ("a red squares moving left", "0 shapes"),  # no plurals: a video shows one object
    ("a red square moving", "0 directions"),
    ("a red square moving up and left", "2 directions"),
    ("", "0 colours"),
    # a negated or still object, and two objects named alike, were read as the one object moving that way
    ("a red square that is not moving left", "a negation or no motion \\('not'\\)"),
    ("a red square that isn't moving left", "a negation or no motion"),
    ("a red square standing still on the left", "a negation or no motion \\('still'\\)"),
    ("a red square and a red square moving left", "the colour 'red' 2 times; the world has one object"),
    ("a red square moving left, then it stops", "a negation or no motion \\('stops'\\)"),
    ("a red square moving left, then it halts", "a negation or no motion \\('halts'\\)"),
])
def test_prompt_errors_name_what_is_missing(prompt, needle):
    with pytest.raises(ValueError, match=needle):
        world.parse_prompt(prompt)


def test_prompt_for_refuses_unknown_words_and_templates():
    with pytest.raises(ValueError, match="unknown colour 'purple'; the world knows red, green, blue, yellow"):
        world.prompt_for("purple", "square", "left")
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        world.prompt_for("red", "star", "left")
    with pytest.raises(ValueError, match="unknown direction 'north'"):
        world.prompt_for("red", "square", "north")
    with pytest.raises(ValueError, match="templates 0-2"):
        world.prompt_for("red", "square", "left", template=3)
    with pytest.raises(ValueError, match="unknown shape"):
        world.shape_coverage("star", 10.0, np.zeros(1), np.zeros(1))


# ---------------------------------------------------------------------------------------------- determinism
def test_video_is_a_function_of_prompt_and_seed():
    a, scene_a = world.world_video("a red square moving left", 7, num_frames=9)
    b, scene_b = world.world_video("a red square moving left", 7, num_frames=9)
    assert scene_a == scene_b and np.array_equal(a, b)
    # the phrasing does not matter, only what it names
    c, scene_c = world.world_video("the red square moves left across the frame", 7, num_frames=9)
    assert scene_c == scene_a and np.array_equal(c, a)
    # another seed draws another scene (size, speed, start and background all change)
    other = world.scene_for("a red square moving left", 8)
    assert all(getattr(other, f) != getattr(scene_a, f) for f in ("size", "speed", "start", "background"))
    # the prompt fixes colour, shape and direction; the seed the rest
    blue = world.scene_for("a blue circle moving up", 7)
    assert (blue.colour, blue.shape, blue.direction) == ("blue", "circle", "up")
    assert (blue.size, blue.speed, blue.start) == (scene_a.size, scene_a.speed, scene_a.start)
    assert world.dataset_item(5, seed=1) == world.dataset_item(5, seed=1) != world.dataset_item(6, seed=1)


def test_scene_parameters_stay_in_their_ranges():
    for seed in range(50):
        s = world.scene_for("a green circle moving down", seed)
        assert world.SIZE_RANGE[0] <= s.size <= world.SIZE_RANGE[1]
        assert world.SPEED_RANGE[0] <= s.speed <= world.SPEED_RANGE[1]
        assert abs(s.start[0] - H / 2) <= world.START_JITTER and abs(s.start[1] - W / 2) <= world.START_JITTER
        assert all(world.BACKGROUND_RANGE[0] <= v <= world.BACKGROUND_RANGE[1] for c in s.background for v in c)


# ------------------------------------------------------------------------------------------------- geometry
def test_geometry_and_range():
    video, scene = world.world_video("a yellow circle moving right", 3)
    assert video.shape == (3, 81, 96, 128) and video.dtype == np.float32
    assert world.NUM_FRAMES == 1 + 4 * (21 - 1) and (H // 8, W // 8) == (12, 16)  # 21 latent frames of 12 x 16
    assert video.min() >= -1 and video.max() <= 1
    # fully covered pixels show the object's colour, uncovered ones the background, both exactly
    a = world.coverage(scene, scene.centre([0])[0], H, W)
    rgb = (video[:, 0].astype(np.float64).transpose(1, 2, 0) + 1) / 2
    np.testing.assert_allclose(rgb[a == 1], np.broadcast_to(world.COLOURS["yellow"], rgb[a == 1].shape), atol=1e-6)
    np.testing.assert_allclose(rgb[a == 0], world.background(scene, H, W)[a == 0], atol=1e-6)
    assert (a == 1).sum() > 100 and ((a > 0) & (a < 1)).any()


def test_background_is_static_and_a_clipped_gradient():
    video, scene = world.world_video("a red square moving up", 11, num_frames=5)
    ramp = world.gradient_ramp(scene.background_angle, H, W)
    assert ramp.min() >= 0 and ramp.max() <= 1
    bg = world.background(scene, H, W)
    np.testing.assert_allclose(bg[0, 0], (1 - ramp[0, 0]) * np.array(scene.background[0])
                               + ramp[0, 0] * np.array(scene.background[1]))
    far = np.ones((H, W), bool)
    for t in range(5):
        far &= world.coverage(scene, scene.centre([t])[0], H, W) == 0
    assert np.all(video[:, :, far] == video[:, :1, far])  # the background never changes


# ------------------------------------------------------------------------------------------------ trajectory
def test_motion_is_the_named_direction_at_the_scene_speed():
    for direction, (dy, dx) in world.DIRECTIONS.items():
        s = world.scene_for(f"a red square moving {direction}", 4)
        steps = np.diff(s.centre(np.arange(81)), axis=0)
        np.testing.assert_allclose(steps, np.broadcast_to([dy * s.speed, dx * s.speed], steps.shape), atol=1e-12)


@pytest.mark.parametrize("prompt", ["a red square moving left", "a blue circle moving up",
                                    "a green circle moving right", "a yellow square moving down"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rendered_centroid_is_the_scene_centre_on_the_torus(prompt, seed):
    video, scene = world.world_video(prompt, seed)
    alpha = alpha_from_pixels(video, scene)
    truth = scene.centre(np.arange(video.shape[1])) % np.array([H, W])
    errors = np.array([torus_diff(torus_centroid(a), c) for a, c in zip(alpha, truth)])
    assert np.abs(errors).max() <= centroid_tol(scene)


def test_wrap_around_keeps_the_object_whole():
    """An object centred on the frame's corner is drawn in four pieces whose coverage adds up to the same object
    drawn in the middle, and its centroid on the torus is still the centre."""
    for shape in world.SHAPES:
        scene = world.Scene("red", shape, "left", 20.5, 1.0, (0.3, 0.7), ((0.2, 0.2, 0.2), (0.3, 0.3, 0.3)), 0.4)
        corner = world.coverage(scene, np.array([0.3, 0.7]), H, W)
        middle = world.coverage(scene, np.array([48.3, 64.7]), H, W)
        assert corner[:5, :5].sum() > 0 and corner[-5:, -5:].sum() > 0 and corner[:5, -5:].sum() > 0
        assert corner[30:60, 40:90].sum() == 0
        np.testing.assert_allclose(corner.sum(), middle.sum(), rtol=1e-12)
        np.testing.assert_allclose(np.sort(corner.ravel()), np.sort(middle.ravel()), atol=1e-12)
        assert np.abs(torus_diff(torus_centroid(corner), [0.3, 0.7])).max() <= centroid_tol(scene)
    # a scene whose object leaves the frame on the right comes back on the left, one frame later
    scene = world.Scene("blue", "circle", "right", 18.0, 1.25, (40.0, 100.0), ((0.1,) * 3, (0.4,) * 3), 1.0)
    video = world.render(scene, num_frames=30)
    alpha = alpha_from_pixels(video, scene)
    for t in range(30):
        c = scene.centre([t])[0]
        assert np.abs(torus_diff(torus_centroid(alpha[t]), c)).max() <= centroid_tol(scene)
    assert alpha[0][:, :3].max() < 1e-6 and alpha[29][:, :3].max() > 0.5  # it re-entered on the left side
    assert scene.centre([29])[0][1] > W  # the ground truth keeps growing (unwrapped)


def test_frames_of_a_long_video_continue_the_short_one():
    scene = world.scene_for("a green square moving down", 9)
    whole = world.render(scene, num_frames=90)
    np.testing.assert_array_equal(world.render(scene, num_frames=10, first_frame=80), whole[:, 80:])

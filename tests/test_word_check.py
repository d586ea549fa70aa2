"""The word check (training/word_check.py): swaps make valid prompts naming the swapped word; a model that ignores
its context gets ratio exactly 1 for every word (through the whole path: held-out videos, the VAE, the text
encoder, a bidirectional and a causal DiT); a stub that reads the colour and direction words but not the shape
word gets the ratios a float64 reference computes, and exactly 1 for shape."""

import math

import pytest
import torch

from conftest import tiny_model
from models import world
from models.common.rollout import _from_model, _to_model
from models.common.scheduler import FlowMatchScheduler
from models.wan.embedded import EMBEDDED_DIR
from training.errors import TrainingError
from training.word_check import (KINDS, SWAPS, describe, flow_word_errors, swap_word, variant_prompts,
                                 word_sensitivity)

pytestmark = pytest.mark.usefixtures("one_thread")
WORD_KINDS = ("colour", "shape", "direction")


# ------------------------------------------------------------------------------------------------------
# the swaps


def test_swaps_make_valid_prompts_that_name_the_swapped_word():
    for template in range(len(world.TEMPLATES)):
        for prompt in world.prompt_grid(template):
            named = dict(zip(WORD_KINDS, world.parse_prompt(prompt)))
            for kind in WORD_KINDS:
                swapped = swap_word(prompt, kind)
                got = dict(zip(WORD_KINDS, world.parse_prompt(swapped)))  # still exactly one word of each kind
                assert got[kind] == SWAPS[kind][named[kind]] != named[kind], (prompt, kind, swapped)
                assert {k: v for k, v in got.items() if k != kind} == {k: v for k, v in named.items() if k != kind}
                assert swapped.replace(got[kind], named[kind]) == prompt  # only the word changed: the phrasing kept
                assert swap_word(swapped, kind) == prompt  # each swap is its own inverse
    assert all(sorted(s) == sorted(s.values()) for s in SWAPS.values())  # every word has a partner in its kind
    assert set(SWAPS["colour"]) == set(world.COLOURS) and set(SWAPS["shape"]) == set(world.SHAPES)
    assert set(SWAPS["direction"]) == set(world.DIRECTIONS)


def test_variant_prompts_and_bad_input():
    prompts = ["a red square moving left", "a blue circle moving up"]
    assert variant_prompts(prompts, "true") == prompts
    assert variant_prompts(prompts, "empty") == ["", ""]
    assert variant_prompts(prompts, "direction") == ["a red square moving right", "a blue circle moving down"]
    with pytest.raises(TrainingError, match="unknown word kind 'size'"):
        swap_word(prompts[0], "size")
    x0 = torch.zeros(2, 3, 16, 4, 4)
    with pytest.raises(TrainingError, match="timesteps \\[0.0\\]"):
        flow_word_errors(tiny_model(causal=False), lambda ps: torch.zeros(len(ps), 4, 32), prompts, x0, timesteps=(0,))
    with pytest.raises(TrainingError, match="1 prompts for 2 latent videos"):
        flow_word_errors(tiny_model(causal=False), lambda ps: torch.zeros(len(ps), 4, 32), prompts[:1], x0)


def test_describe_is_the_log_line():
    ratios = {"colour": 3.6401, "shape": 1.0123, "direction": 1.04, "empty": 1.2}
    result = {"timesteps": {k: {"ratios": ratios} for k in ("900", "700", "500")}}
    assert describe(result) == ("colour x3.64, shape x1.01, direction x1.04, empty prompt x1.20 "
                                "(flow error ratio with the word swapped, t=700)")
    assert describe({"timesteps": {k: {"ratios": ratios} for k in ("800", "600", "400")}}).endswith("t=600)")
    with pytest.raises(TrainingError, match="timestep 100 was not checked"):
        describe(result, 100)


# ------------------------------------------------------------------------------------------------------
# a model that ignores the words, through the whole path


@pytest.fixture(scope="module")
def text_and_vae():
    from models.wan.text_encoder import TextEncoder
    from models.wan.vae import WanVAE

    return TextEncoder.from_wan_dir(EMBEDDED_DIR), WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth")


@pytest.mark.parametrize("causal", [False, True])
def test_a_model_that_ignores_its_context_gets_ratio_one(text_and_vae, causal):
    encoder, vae = text_and_vae
    model = tiny_model(causal=causal, text_dim=encoder.text_dim)
    kw = dict(videos=3, frames=3, timesteps=(900, 500), seed=4)
    reads = word_sensitivity(model, encoder, vae, **kw)  # the check can fail: a random DiT reads its context
    assert all(r["ratios"][k] != 1.0 for r in reads["timesteps"].values() for k in KINDS), reads
    with torch.no_grad():
        for block in model.blocks:  # the cross-attention's output projection zeroed: the text cannot reach x
            block.cross_attn.o.weight.zero_()
            block.cross_attn.o.bias.zero_()
    result = word_sensitivity(model, encoder, vae, **kw)
    assert list(result["timesteps"]) == ["900", "500"] and (result["videos"], result["frames"]) == (3, 3)
    for r in result["timesteps"].values():
        assert r["ratios"] == {k: 1.0 for k in KINDS}, r
        assert math.isfinite(r["errors"]["true"]) and r["errors"]["true"] > 0
    grid = FlowMatchScheduler(5.0).timesteps
    assert result["timesteps"]["900"]["t"] == round(float(grid[(grid - 900).abs().argmin()]), 3)
    assert word_sensitivity(model, encoder, vae, **kw)["timesteps"] == result["timesteps"]  # seeded


# ------------------------------------------------------------------------------------------------------
# a stub that reads two of the three words


VOCAB = [*world.COLOURS, *world.SHAPES, *world.DIRECTIONS]  # 10 words


def one_hot_words(prompts: list[str]) -> torch.Tensor:
    """Context [B, 3, 10]: row k is the one-hot of the prompt's colour / shape / direction word; zeros for ""."""
    out = torch.zeros(len(prompts), 3, len(VOCAB))
    for i, p in enumerate(prompts):
        if p:
            for k, word in enumerate(world.parse_prompt(p)):
                out[i, k, VOCAB.index(word)] = 1.0
    return out


class ColourDirectionStub(torch.nn.Module):
    """Predicts the exact flow towards x0_hat = the colour pattern + the direction pattern its context names
    (zero for a word it is not given): it reads the colour and direction words and ignores the shape word."""

    def __init__(self, patterns: dict, causal: bool):
        super().__init__()
        self.patterns, self.causal = patterns, causal  # kind -> [words of the kind, F, C, H, W] float64
        self.scheduler = FlowMatchScheduler(5.0)
        self.t_shapes = []

    def forward(self, x, t, context):
        self.t_shapes.append(tuple(t.shape))
        x_t = _from_model(x).double()  # [B, F, C, H, W]
        colour = context[:, 0, :4].double()  # [B, 4]
        direction = context[:, 2, 6:].double()  # [B, 4]
        x0_hat = (torch.einsum("bk,kfchw->bfchw", colour, self.patterns["colour"])
                  + torch.einsum("bk,kfchw->bfchw", direction, self.patterns["direction"]))
        sigma = self.scheduler.sigma(t)  # [B] or [B, F]
        sigma = sigma.reshape(sigma.shape + (1,) * (x_t.ndim - sigma.ndim))
        return _to_model(((x_t - x0_hat) / sigma).float())


@pytest.mark.parametrize("causal", [False, True])
def test_a_model_that_reads_a_word_gets_the_reference_ratio(causal):
    gen = torch.Generator().manual_seed(3)
    F_, C, H, W = 2, 4, 3, 5
    patterns = {kind: torch.randn(n, F_, C, H, W, generator=gen, dtype=torch.float64)
                for kind, n in (("colour", 4), ("shape", 2), ("direction", 4))}
    grid = world.prompt_grid()
    prompts = [grid[(5 * i) % len(grid)] for i in range(8)]
    named = [dict(zip(WORD_KINDS, world.parse_prompt(p))) for p in prompts]
    vocab = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "direction": list(world.DIRECTIONS)}

    def pattern(kind, word):
        return patterns[kind][vocab[kind].index(word)]

    x0 = torch.stack([sum(pattern(k, n[k]) for k in WORD_KINDS) for n in named])  # [8, F, C, H, W] float64
    stub = ColourDirectionStub(patterns, causal)
    result = flow_word_errors(stub, one_hot_words, prompts, x0.float(), timesteps=(900, 700, 500))
    assert set(stub.t_shapes) == {(8, F_) if causal else (8,)}  # per-frame timesteps for a causal model

    def reference_error(kind):  # float64: the flow error is |x0_hat - x0|^2 / sigma^2; sigma cancels in a ratio
        errs = []
        for n, x in zip(named, x0):
            if kind == "empty":
                hat = torch.zeros_like(x)
            else:
                words = {k: SWAPS[k][n[k]] if k == kind else n[k] for k in WORD_KINDS}
                hat = pattern("colour", words["colour"]) + pattern("direction", words["direction"])
            errs.append(((hat - x) ** 2).mean())
        return float(torch.stack(errs).mean())

    for key, r in result["timesteps"].items():
        assert r["ratios"]["shape"] == 1.0, (key, r)  # the stub ignores the shape word: bitwise the same flow
        for kind in ("colour", "direction", "empty"):
            want = reference_error(kind) / reference_error("true")
            assert want > 1.5 and r["ratios"][kind] == pytest.approx(want, rel=1e-4), (key, kind, r)
        sigma = float(FlowMatchScheduler(5.0).sigma(torch.tensor(r["t"])))
        assert r["errors"]["true"] == pytest.approx(reference_error("true") / sigma ** 2, rel=1e-4)


# ------------------------------------------------------------------------------------------------------
# the zoo's check stage runs it


def test_check_models_reports_the_words_of_each_model(text_and_vae, tmp_path, monkeypatch):
    """check_models on a folder holding only the teacher (data/embedded without its student checkpoints): the
    teacher's words entry is the word check of that DiT loaded bidirectional, and the log has its line."""
    import re
    import shutil

    from models.wan.checkpoint import load_wan
    from training.zoo_check import check_models

    folder = shutil.copytree(EMBEDDED_DIR, tmp_path / "teacher_only", ignore=shutil.ignore_patterns("*.pt"))
    # (no prompt cache: its entries may come from a run on another number of threads, equal to rounding only)
    monkeypatch.setenv("WORKBENCH_PROMPT_CACHE", "0")
    lines = []
    result = check_models(folder, "cpu", frames=3, short=True, log=lines.append, shift=5.0)
    assert list(result) == ["teacher"]
    encoder, vae = text_and_vae
    direct = word_sensitivity(load_wan(folder, causal=False).eval(), encoder, vae, videos=2, frames=3)
    words = result["teacher"]["words"]
    assert (words["videos"], words["frames"], words["shift"]) == (2, 3, 5.0)
    assert words["timesteps"] == direct["timesteps"]
    pattern = (r"\[check\] teacher words: colour x\d+\.\d\d, shape x\d+\.\d\d, direction x\d+\.\d\d, "
               r"empty prompt x\d+\.\d\d \(flow error ratio with the word swapped, t=700\)")
    assert any(re.fullmatch(pattern, line) for line in lines), lines

"""The umT5 text encoder (models/wan/text_encoder.py).

The key map and the umT5 semantics are checked against `wan_t5_reference` below: Wan's `wan/modules/t5.py`
T5Encoder math written out by hand (per-layer relative position bias with Wan's bucket formula, no attention
scaling, RMS norms with the variance in float32 as Wan computes it, gated GELU-tanh FFN where `gate` carries the
GELU and `fc1` the linear branch, padding masked, final norm), then Self-Forcing's zeroing past each length.
A mutation test shows that the comparison would catch a wrong map (swapped tensors).
"""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import embedded_maker
from models.errors import CheckpointError, ModelInputError, ModelInputWarning
from models.wan.text_encoder import (PromptEmbeddings, TextEncoder, TokenizerNotFoundError, build_umt5_encoder,
                                 clean_prompt, hf_to_wan_key, load_tokenizer, wan_to_hf_key)

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "embedded"
TOKENIZER = EMBEDDED / "google" / "umt5-xxl"
SMALL = dict(d_model=32, num_layers=3, num_heads=4, d_kv=8, d_ff=48, num_buckets=32)
WORLD_PROMPTS = [line for line in (ROOT / "data" / "prompts" / "world.txt").read_text().splitlines() if line]
PROMPTS = ["A red fox runs through the snowy forest at dawn, camera pans slowly.",
           "  the   old  robot &amp; a tiny  cat dance   on a neon rooftop at night  ",
           "ocean"]


make = embedded_maker()


class PickledDict(dict):
    """A dict subclass: torch.load(weights_only=True) refuses to rebuild it."""


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def small_sd(tokenizer):
    return make.wan_t5_state_dict(vocab=len(tokenizer), **SMALL, seed=7, dtype=torch.float32)


@pytest.fixture(scope="module")
def small_pth(small_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "t5.pth"
    torch.save(dict(small_sd), path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Independent reference: Wan's T5Encoder math
# ---------------------------------------------------------------------------------------------------------

def _float64_tolerance() -> float:
    """transformers' UMT5 attention took its softmax in float32 (`scores.float()`, as Wan's own T5 does) up to
    5.14 and in the scores' dtype from 5.15: a float64 encoder equals the float64 math below to 1e-9 from 5.15, to
    float32's rounding before (4.8e-7 measured on 5.14.1; pyproject.toml allows >= 4.51)."""
    import transformers
    from packaging.version import Version

    return 1e-9 if Version(transformers.__version__) >= Version("5.15") else 1e-6


F64_TOL = _float64_tolerance()


def wan_bucket(rel: torch.Tensor, num_buckets: int, max_dist: int = 128) -> torch.Tensor:
    """Wan T5RelativeEmbedding._relative_position_bucket, bidirectional (rel = key pos - query pos)."""
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_dist / max_exact)
                         * (half - max_exact)).long()
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return buckets + torch.where(rel < max_exact, rel, large)


def wan_t5_reference(sd, ids, mask):
    """ids, mask [B, L] -> context [B, L, D] in float64, zero past each length."""
    sd = {k: v.double() for k, v in sd.items()}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_buckets, n_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    x = sd["token_embedding.weight"][ids]                                   # [B, L, D]
    b, length, _ = x.shape
    pos = torch.arange(length)
    bucket = wan_bucket(pos[None, :] - pos[:, None], n_buckets)            # [Lq, Lk]

    def rms(v, w):  # Wan T5LayerNorm: variance from x.float()
        return w * (v * torch.rsqrt(v.float().pow(2).mean(-1, keepdim=True) + 1e-6))

    def gelu_tanh(v):
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))

    for i in range(n_layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q = (h @ sd[p + "attn.q.weight"].T).view(b, length, n_heads, -1)   # [B, L, H, dk]
        k = (h @ sd[p + "attn.k.weight"].T).view(b, length, n_heads, -1)
        v = (h @ sd[p + "attn.v.weight"].T).view(b, length, n_heads, -1)
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]  # [1, H, Lq, Lk]
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias               # no 1/sqrt(dk)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        attn = scores.softmax(dim=-1)
        o = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1) @ sd[p + "attn.o.weight"].T
        x = x + o
        h = rms(x, sd[p + "norm2.weight"])
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)) \
            @ sd[p + "ffn.fc2.weight"].T
    x = rms(x, sd["norm.weight"])
    return x * mask[..., None].double()


def reference_for(tokenizer, sd, prompts, text_len=512):
    batch = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                      max_length=text_len, return_tensors="pt")
    return wan_t5_reference(sd, batch["input_ids"], batch["attention_mask"]), batch


# ---------------------------------------------------------------------------------------------------------
# Agreement with Wan's math
# ---------------------------------------------------------------------------------------------------------

def test_encoder_equals_wan_t5_math_float64(tokenizer, small_sd, small_pth):
    enc = TextEncoder.from_files(small_pth, TOKENIZER, dtype=torch.float64)
    out = enc.encode(PROMPTS)
    ref, batch = reference_for(tokenizer, small_sd, PROMPTS)
    assert out.context.shape == (3, 512, SMALL["d_model"]) and out.context.dtype == torch.float64
    assert out.lengths == batch["attention_mask"].sum(1).tolist()
    torch.testing.assert_close(out.context, ref, rtol=F64_TOL, atol=F64_TOL)
    # the 512-token window reaches every relative-position bucket, including the log range and the clamp
    # (bucket 16 would be "distance +0", which cannot happen: distance 0 is bucket 0)
    pos = torch.arange(512)
    assert set(wan_bucket(pos[None, :] - pos[:, None], 32).unique().tolist()) == set(range(32)) - {16}


def test_long_prompt_reaches_the_far_buckets_and_equals_the_padded_math_float64(tokenizer, small_sd, small_pth):
    """The encoder runs only up to the longest prompt's columns. With a prompt of 200-500 tokens (real tokens
    at distances past 128: the log range and the clamp of the position buckets) beside a one-word prompt, each
    row still equals Wan's math on all 512 columns, in float64."""
    long = " ".join(["a slow pan over the red canyon, then a hawk circles the bright sun"] * 16)
    prompts = [long, "ocean"]
    enc = TextEncoder.from_files(small_pth, TOKENIZER, dtype=torch.float64)
    out = enc.encode(prompts)
    ref, _ = reference_for(tokenizer, small_sd, prompts)
    assert 200 < out.lengths[0] < 512 and out.lengths[1] < 10
    torch.testing.assert_close(out.context, ref, rtol=F64_TOL, atol=F64_TOL)
    pos = torch.arange(out.lengths[0])
    assert set(wan_bucket(pos[None, :] - pos[:, None], 32).unique().tolist()) == set(range(32)) - {16}


def test_encoder_work_stops_at_the_longest_prompt(small_pth):
    """A short prompt costs its own tokens of encoder work, not text_len's: the model sees as many columns as
    the batch's longest prompt has tokens (padding is masked, so those columns change nothing)."""
    enc = TextEncoder.from_files(small_pth, TOKENIZER)
    seen = []
    hook = enc.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape),
                                               with_kwargs=True)
    try:
        out = enc.encode(PROMPTS)
    finally:
        hook.remove()
    assert seen == [(3, max(out.lengths))] and out.context.shape[1] == 512


def test_embedded_bf16_encoder_float32_equals_wan_t5_math(tokenizer):
    enc = TextEncoder.from_wan_dir(EMBEDDED)
    assert (enc.text_dim, enc.text_len) == (64, 512)
    sd = make.wan_t5_state_dict(vocab=len(tokenizer), **make.T5_SIZES, dtype=torch.bfloat16)
    out = enc.encode(PROMPTS[:2])
    ref, _ = reference_for(tokenizer, sd, PROMPTS[:2])
    torch.testing.assert_close(out.context.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("swap", [
    ("blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight"),
    ("blocks.1.attn.q.weight", "blocks.1.attn.k.weight"),
    ("blocks.0.pos_embedding.embedding.weight", "blocks.2.pos_embedding.embedding.weight"),
    ("blocks.2.norm1.weight", "blocks.2.norm2.weight"),
])
def test_reference_comparison_catches_a_wrong_key_map(tokenizer, small_sd, swap):
    """Loading with two same-shaped tensors exchanged (what a wrong map does) moves the output far away."""
    wrong = dict(small_sd)
    wrong[swap[0]], wrong[swap[1]] = small_sd[swap[1]], small_sd[swap[0]]
    model = build_umt5_encoder(wrong).double()
    ref, batch = reference_for(tokenizer, small_sd, PROMPTS[:1])
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    n = int(batch["attention_mask"].sum())
    assert (got[0, :n] - ref[0, :n]).abs().max() > 1e-2


def test_key_map_roundtrip_and_covers_the_model(small_sd):
    for key in small_sd:
        assert hf_to_wan_key(wan_to_hf_key(key)) == key
    model = build_umt5_encoder(small_sd)
    hf_keys = set(model.state_dict())
    assert {wan_to_hf_key(k) for k in small_sd} | {"encoder.embed_tokens.weight"} == hf_keys
    assert model.encoder.embed_tokens.weight is model.shared.weight  # one embedding, still tied
    cfg = model.config
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.relative_attention_num_buckets) == \
        (32, 3, 4, 8, 48, 32)


# ---------------------------------------------------------------------------------------------------------
# Semantics: padding, tokens, truncation, batch independence
# ---------------------------------------------------------------------------------------------------------

def test_padding_rows_are_zero_and_tokens_line_up(tokenizer, small_pth):
    enc = TextEncoder.from_files(small_pth, TOKENIZER)
    out = enc.encode(PROMPTS)
    assert isinstance(out, PromptEmbeddings)
    for i, p in enumerate(PROMPTS):
        n = out.lengths[i]
        ids = tokenizer(clean_prompt(p))["input_ids"]
        assert n == len(ids) and 1 < n < 512
        assert out.tokens[i][:n] == tokenizer.convert_ids_to_tokens(ids)
        assert out.tokens[i][n - 1] == "</s>" and out.tokens[i][n:] == [""] * (512 - n)
        assert len(out.tokens[i]) == 512
        assert torch.all(out.context[i, n:] == 0)
        assert torch.all(out.context[i, :n].abs().sum(-1) > 0)


def test_result_does_not_depend_on_the_rest_of_the_batch(small_pth):
    enc = TextEncoder.from_files(small_pth, TOKENIZER)
    both = enc.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]], batch_size=2)
    alone = enc.encode([PROMPTS[1]])
    torch.testing.assert_close(both.context[1], alone.context[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.context[0], both.context[2])
    assert both.lengths[1] == alone.lengths[0] and both.tokens[1] == alone.tokens[0]


def test_truncation_keeps_text_len_and_eos(small_pth):
    from models.errors import ModelInputWarning

    enc = TextEncoder.from_files(small_pth, TOKENIZER, text_len=8)
    with pytest.warns(ModelInputWarning, match=r"has \d+ tokens; the text encoder reads the first 8 \(as Wan2.1 does\)"):
        out = enc.encode([PROMPTS[0], "cat"])
    assert out.context.shape == (2, 8, SMALL["d_model"])
    assert out.lengths[0] == 8 and out.tokens[0][-1] == "</s>"
    assert out.lengths[1] < 8 and torch.all(out.context[1, out.lengths[1]:] == 0)


def test_clean_prompt_follows_wan_whitespace_cleaning():
    assert clean_prompt("  a  &amp;amp;\tb \n c  ") == "a & b c"
    assert clean_prompt("\u201cquoted\u201d") == '"quoted"'  # ftfy.fix_text uncurls quotes, as in Wan


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------

def test_cache_encodes_each_prompt_once_per_encoder(small_pth, tmp_path):
    cache = tmp_path / "cache"
    first = TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=cache).encode(PROMPTS)
    entries = sorted(p for p in cache.rglob("*.safetensors"))
    assert len(entries) == len(PROMPTS)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]

    again = TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=cache)

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder ran although every prompt is cached")
    again.model.forward = refuse
    second = again.encode(list(reversed(PROMPTS)))
    torch.testing.assert_close(second.context, first.context.flip(0), rtol=0, atol=0)
    assert second.tokens == first.tokens[::-1] and second.lengths == first.lengths[::-1]

    other = TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=cache, text_len=64)
    assert other.identity != again.identity
    assert other.encode(PROMPTS[:1]).context.shape == (1, 64, SMALL["d_model"])
    assert len(sorted(cache.rglob("*.safetensors"))) == len(PROMPTS) + 1
    # the same prompts cached again elsewhere: the same bytes (safetensors wrote its header's metadata keys in a
    # hash map's order, which changes from map to map)
    TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=tmp_path / "twin").encode(PROMPTS)
    for entry in entries:
        assert (tmp_path / "twin" / entry.relative_to(cache)).read_bytes() == entry.read_bytes(), entry.name


def test_a_cpu_encoders_cache_entries_are_those_of_its_thread_count(small_pth, tmp_path):
    """On the CPU the encoder's output rounds otherwise at another torch thread count (up to 1e-6 with umT5 on this
    machine: 1e-4 in a rollout's latents): an entry made at one count is not read at another, so a prompt's
    embedding does not depend on which run encoded it first."""
    cache, threads = tmp_path / "cache", torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=cache).encode(PROMPTS[:1])
    finally:
        torch.set_num_threads(threads)
    assert len(sorted(cache.rglob("*.safetensors"))) == 2  # one per thread count, the second 1-thread run read


def test_prompts_in_the_cache_are_read_without_loading_the_encoder(small_pth, tmp_path, monkeypatch):
    """An encoder made from files loads its tokenizer and weights at its first prompt the cache lacks: prompts the
    cache holds come back bitwise as encoded, tokens and lengths too, with nothing loaded (in a fresh process
    transformers is not even imported: the seconds a command's start saves); a cached prompt longer than text_len
    still warns where it is cut. Weights replaced before that first load are refused, not loaded under the old
    file's labels; a cache that cannot be written warns once and the encoding goes on."""
    import subprocess
    import sys
    import warnings

    cache, prompts = tmp_path / "cache", [PROMPTS[0], "ocean", "a red square moving right"]  # (the first: 12+ tokens)
    with pytest.warns(ModelInputWarning, match="reads the first 12") as said:
        first = TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=cache, text_len=12).encode(prompts)
    lazy = TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=cache, text_len=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelInputWarning)
        again = lazy.encode(prompts[1:][::-1])  # (both fit in 12 tokens)
    assert lazy._model is None and lazy._tokenizer is None
    assert torch.equal(again.context, first.context[1:].flip(0))
    assert again.tokens == first.tokens[1:][::-1] and again.lengths == first.lengths[1:][::-1]
    with pytest.warns(ModelInputWarning, match="reads the first 12") as again_said:
        assert torch.equal(lazy.encode(prompts[:1]).context, first.context[:1])
    assert [str(w.message) for w in again_said] == [str(w.message) for w in said]  # (where it is cut, from the cache)
    assert lazy._model is None and lazy._tokenizer is None
    with torch.inference_mode():  # (the first load under a caller's inference mode)
        inside = TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=tmp_path / "c2", text_len=12)
        inside = inside.encode(prompts[1:]).context
    assert torch.equal(inside, TextEncoder.from_files(small_pth, TOKENIZER, text_len=12).encode(prompts[1:]).context)
    code = (f"import sys; from models.wan.text_encoder import TextEncoder as T; e = T.from_files({str(small_pth)!r}, "
            f"{str(TOKENIZER)!r}, cache_dir={str(cache)!r}, text_len=12); c = e.encode({prompts[1:]!r}).context; "
            "print(c.shape[1], 'transformers' in sys.modules, e._model is None)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.split() == ["12", "False", "True"], run.stderr[-2000:]

    weights = tmp_path / "t5.pth"
    weights.write_bytes(small_pth.read_bytes())
    made = TextEncoder.from_files(weights, TOKENIZER, cache_dir=cache)
    (tmp_path / "new.pth").write_bytes(small_pth.read_bytes()[:-8] + b"\0" * 8)
    (tmp_path / "new.pth").replace(weights)
    with pytest.warns(ModelInputWarning, match="no longer those of"), \
            pytest.raises(CheckpointError, match="t5.pth changed between the making of the encoder and the loading"):
        made.encode(["ocean"])
    tokenizer = tmp_path / "tok"  # the same for the tokenizer's files: its identity is in the cache's names
    shutil.copytree(TOKENIZER, tokenizer)
    made = TextEncoder.from_files(small_pth, tokenizer, cache_dir=cache)
    (tokenizer / "tokenizer_config.json").write_text((tokenizer / "tokenizer_config.json").read_text() + "\n")
    with pytest.warns(ModelInputWarning, match="its tokenizer files are no longer those of .*tok as loaded"), \
            pytest.raises(CheckpointError, match="tokenizer_config.json changed between the making of the encoder"):
        made.encode(["ocean"])

    import models.wan.text_encoder as te

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(te, "atomic_write_bytes", full)
    unwritable = TextEncoder.from_files(small_pth, TOKENIZER, cache_dir=tmp_path / "full")
    with pytest.warns(ModelInputWarning, match="cannot write the prompt cache .*No space left on device.*goes on"):
        out = unwritable.encode(["ocean", "a blue circle"])
    uncached = TextEncoder.from_files(small_pth, TOKENIZER).encode(["ocean", "a blue circle"])
    assert torch.equal(out.context, uncached.context)
    assert not (tmp_path / "full").exists()


def test_the_prompt_cache_is_off_once_the_weights_are_not_the_files_as_loaded(small_sd, small_pth, tmp_path):
    """The cache's entries are named by the weights file's identity, worked out at first use: a file replaced after
    loading stored the old weights' embeddings under the new file's name, for every later process to read; weights
    changed in memory read the old embeddings. Either way the cache is now neither read nor written (one warning)."""
    weights, cache = tmp_path / "t5.pth", tmp_path / "cache"
    weights.write_bytes(small_pth.read_bytes())
    other_sd = {k: v * 1.5 if k == "norm.weight" else v for k, v in small_sd.items()}
    truth = {w: TextEncoder.from_state_dict(sd, TOKENIZER).encode(PROMPTS[:1]).context for w, sd in
             (("old", small_sd), ("new", other_sd))}
    assert not torch.equal(truth["old"], truth["new"])  # (the comparison can fail)

    import os
    import warnings

    loaded = TextEncoder.from_files(weights, TOKENIZER, cache_dir=cache)
    os.chmod(weights, 0o600)  # its metadata alone (the ctime moves): the same bytes, the cache stays on
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelInputWarning)
        assert torch.equal(loaded.encode(PROMPTS[:1]).context, truth["old"])
    assert len(list(cache.rglob("*.safetensors"))) == 1
    shutil.rmtree(cache)
    torch.save(dict(other_sd), tmp_path / "new.pth")
    (tmp_path / "new.pth").replace(weights)  # replaced before the first encode (a new file: the old may be mapped)
    with pytest.warns(ModelInputWarning, match="no longer those of .*t5.pth as loaded"):
        assert torch.equal(loaded.encode(PROMPTS[:1]).context, truth["old"])
    assert not list(cache.rglob("*.safetensors"))  # nothing stored under the new file's identity
    assert torch.equal(TextEncoder.from_files(weights, TOKENIZER, cache_dir=cache).encode(PROMPTS[:1]).context,
                       truth["new"])

    fresh = TextEncoder.from_files(weights, TOKENIZER, cache_dir=cache)  # (its prompt is in the cache now)
    fresh.model.load_state_dict(TextEncoder.from_state_dict(small_sd, TOKENIZER).model.state_dict())
    with pytest.warns(ModelInputWarning, match="changed in memory"):
        assert torch.equal(fresh.encode(PROMPTS[:1]).context, truth["old"])


def test_identity_changes_with_weights_and_tokenizer_files(small_sd, small_pth, tmp_path):
    base = TextEncoder.from_files(small_pth, TOKENIZER).identity
    assert len(base) == 64 and base == TextEncoder.from_files(small_pth, TOKENIZER).identity
    other_sd = dict(small_sd)
    other_sd["norm.weight"] = small_sd["norm.weight"] + 1
    other_pth = tmp_path / "other.pth"
    torch.save(other_sd, other_pth)
    assert TextEncoder.from_files(other_pth, TOKENIZER).identity != base
    tok_copy = tmp_path / "tok"
    tok_copy.mkdir()
    for f in TOKENIZER.iterdir():
        (tok_copy / f.name).write_bytes(f.read_bytes())
    assert TextEncoder.from_files(small_pth, tok_copy).identity == base
    (tok_copy / ".tokenizer.json.swp").write_text("an editor's")  # hidden files: no tokenizer reads them
    (tok_copy / ".cache" / "huggingface").mkdir(parents=True)
    (tok_copy / ".cache" / "huggingface" / "tokenizer.json.metadata").write_text("a download tool's")
    assert TextEncoder.from_files(small_pth, tok_copy).identity == base
    from models.files import file_stamps

    assert set(file_stamps(tok_copy)) == {str(tok_copy / f.name) for f in TOKENIZER.iterdir() if f.is_file()}
    under_hidden = tmp_path / ".cache" / "tok"  # (a folder under a hidden one: only names inside it count)
    shutil.copytree(TOKENIZER, under_hidden)
    assert TextEncoder.from_files(small_pth, under_hidden).identity == base
    (tok_copy / "tokenizer_config.json").write_text((TOKENIZER / "tokenizer_config.json").read_text() + "\n")
    assert TextEncoder.from_files(small_pth, tok_copy).identity != base


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

def test_missing_tokenizer_folder_names_the_expected_path(small_pth, tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="google/umt5-xxl"):
        TextEncoder.from_files(small_pth, tmp_path / "google" / "umt5-xxl")
    wan_dir = tmp_path / "wan"
    wan_dir.mkdir()
    with pytest.raises(CheckpointError, match="models_t5_umt5-xxl-enc-bf16.pth' \\(the Wan folder's umT5 encoder"):
        TextEncoder.from_wan_dir(wan_dir)  # (the weights are named first)
    shutil.copyfile(small_pth, wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(CheckpointError, match=str(wan_dir / "google" / "umt5-xxl")):
        TextEncoder.from_wan_dir(wan_dir)


def test_a_tokenizer_folder_without_its_vocabulary_is_refused(tmp_path):
    """With its config files and no vocabulary (tokenizer.json, spiece.model), transformers loaded a tokenizer of
    the 4 special tokens: every prompt word became <unk> and the video came out without a word of error."""
    from models.wan.text_encoder import load_tokenizer

    folder = tmp_path / "umt5-xxl"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "embedded" / "google" / "umt5-xxl", folder)
    for name in ("tokenizer.json", "spiece.model"):
        (folder / name).unlink()
    with pytest.raises(TokenizerNotFoundError, match=r"has no vocabulary file \(one of tokenizer.json, spiece.model, "
                                                     r"tokenizer.model\); it holds \['special_tokens_map.json'"):
        load_tokenizer(folder)


def test_a_tokenizer_folder_without_tokenizer_json_reads_spiece_model(tokenizer, tmp_path):
    """A tokenizer folder as transformers < 5 saved it (spiece.model, special_tokens_map.json,
    tokenizer_config.json; no tokenizer.json) tokenizes as the full folder does (transformers converts it through
    protobuf, a dependency for this)."""
    for name in ("spiece.model", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, tmp_path / name)
    old = load_tokenizer(tmp_path)
    for prompt in ("a red square moving right", "A majestic eagle soaring, 2 clouds; cinematic!"):
        assert old(prompt).input_ids == tokenizer(prompt).input_ids


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pth"):
        TextEncoder.from_files(tmp_path / "nothere.pth", TOKENIZER)


def test_a_config_json_beside_the_weights_must_hold_umt5s_settings(small_sd, small_pth, tmp_path):
    """A transformers config.json beside safetensors weights (a diffusers pipeline's text_encoder/): settings the
    weights do not record and the encoder does not read (epsilon, the far bucket distance, the activation) are
    refused unless umT5-XXL's (another epsilon gave embeddings 3e-3 off, gated-relu 0.76, without a word); beside
    a .pth (a Wan folder: the DiT's config.json) it is not read."""
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_sd.items()}, str(weights))
    expected = TextEncoder.from_files(small_pth, TOKENIZER).encode(PROMPTS).context
    assert torch.equal(TextEncoder.from_files(weights, TOKENIZER).encode(PROMPTS).context, expected)  # (none beside)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        TextEncoder.from_files(weights, TOKENIZER)
    umt5 = {"layer_norm_epsilon": 1e-06, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
            "d_model": 32}
    (tmp_path / "config.json").write_text(json.dumps(umt5))
    assert torch.equal(TextEncoder.from_files(weights, TOKENIZER).encode(PROMPTS).context, expected)
    for change in ({"layer_norm_epsilon": 1e-3}, {"feed_forward_proj": "gated-relu"},
                   {"relative_attention_max_distance": 64}):
        (tmp_path / "config.json").write_text(json.dumps(umt5 | change))
        [(key, value)] = change.items()
        with pytest.raises(CheckpointError, match=re.escape(f"config.json: {key} {value!r} (umT5-XXL: ")):
            TextEncoder.from_files(weights, TOKENIZER)
    index = tmp_path / "model.safetensors.index.json"  # (the sharded layout of a pipeline's text_encoder/)
    index.write_text(json.dumps({"weight_map": {k: weights.name for k in small_sd}}))
    with pytest.raises(CheckpointError, match="relative_attention_max_distance 64"):
        TextEncoder.from_files(index, TOKENIZER)
    pth = tmp_path / "t5.pth"
    pth.write_bytes(small_pth.read_bytes())
    assert torch.equal(TextEncoder.from_files(pth, TOKENIZER).encode(PROMPTS).context, expected)


def test_wrong_keys_and_shapes_are_listed(small_sd, tmp_path):
    bad = dict(small_sd)
    del bad["blocks.1.ffn.fc2.weight"]
    bad["blocks.0.attn.extra.weight"] = torch.zeros(2)
    bad["blocks.2.attn.o.weight"] = torch.zeros(32, 16)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as err:
        TextEncoder.from_files(path, TOKENIZER)
    msg = str(err.value)
    assert "blocks.1.ffn.fc2.weight" in msg and "blocks.0.attn.extra.weight" in msg
    assert "blocks.2.attn.o.weight" in msg and str(path) in msg


def test_shared_position_bias_t5_is_refused(small_sd):
    t5 = {k: v for k, v in small_sd.items() if "pos_embedding" not in k}
    t5["pos_embedding.embedding.weight"] = small_sd["blocks.0.pos_embedding.embedding.weight"]
    with pytest.raises(CheckpointError, match="not umT5"):
        build_umt5_encoder(t5)


def test_tokenizer_larger_than_embedding_is_refused(tokenizer, tmp_path):
    sd = make.wan_t5_state_dict(vocab=len(tokenizer) - 10, **SMALL)
    path = tmp_path / "small_vocab.pth"
    torch.save(dict(sd), path)
    with pytest.raises(CheckpointError, match="do not belong together"):
        TextEncoder.from_files(path, TOKENIZER)


def test_pickle_needing_file_is_refused_unless_trusted(small_sd, tmp_path):
    """Refused at the encoder's making, with a prompt cache too (whose encoder loads its weights later, at the first
    prompt the cache lacks)."""
    path = tmp_path / "pickled.pth"
    torch.save(PickledDict(small_sd), path)
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(CheckpointError, match="trust_pickle") as err:
            TextEncoder.from_files(path, TOKENIZER, cache_dir=cache)
        assert str(path) in str(err.value)
    enc = TextEncoder.from_files(path, TOKENIZER, trust_pickle=True, cache_dir=tmp_path / "cache")
    assert enc._model is None and enc.text_dim == SMALL["d_model"]


@pytest.mark.parametrize("bad", ["a single string", [], ["ok", 3]])
def test_bad_prompt_lists_are_refused(small_pth, bad):
    enc = TextEncoder.from_files(small_pth, TOKENIZER)
    with pytest.raises(ModelInputError):
        enc.encode(bad)


# ---------------------------------------------------------------------------------------------------------
# The embedded folder
# ---------------------------------------------------------------------------------------------------------

def test_tokenizer_json_agrees_with_its_sentencepiece_model(tokenizer):
    """tokenizer.json (what transformers loads) and spiece.model (what SentencePiece loads) tokenize alike."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "spiece.model"))
    assert len(tokenizer) == sp.get_piece_size()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for p in PROMPTS + WORLD_PROMPTS + ["Ｆｕｌｌｗｉｄｔｈ ｃａｔ and zebra-like ｔｅｘｔ at 5pm", "an upward redwood"]:
        text = clean_prompt(p)
        assert tokenizer(text)["input_ids"] == sp.encode(text) + [1], text


def test_world_words_are_whole_tokens_with_distinct_embeddings():
    """Every word of the miniature world's prompts is one token, so the colour, shape and direction of a prompt
    each sit at a token of their own; prompts that differ in one word differ at that token's position."""
    from models import world

    words = set(" ".join(WORLD_PROMPTS).split())
    assert words == set(make.WORLD_WORDS)  # the script's list follows models/world.py
    enc = TextEncoder.from_wan_dir(EMBEDDED)
    emb = enc.encode(["a red square moving left", "a blue square moving left", "a red circle moving left",
                      "a red square moving up", ""])
    assert emb.tokens[0][:6] == ["▁a", "▁red", "▁square", "▁moving", "▁left", "</s>"]
    assert emb.lengths == [6, 6, 6, 6, 1]
    c = emb.context.float()
    for other, pos in ((1, 1), (2, 2), (3, 4)):  # colour, shape, direction
        cos = torch.nn.functional.cosine_similarity(c[0, :6], c[other, :6], dim=-1)
        assert cos[pos] < 0.5 and cos[pos] == cos.min(), (other, cos)
    assert set(world.COLOURS) | set(world.SHAPES) | set(world.DIRECTIONS) <= words


def test_make_script_reproduces_the_embedded_files(tmp_path):
    make.main(["--out", str(tmp_path)])
    for name in ("models_t5_umt5-xxl-enc-bf16.pth",):
        new = torch.load(tmp_path / name, weights_only=True)
        old = torch.load(EMBEDDED / name, weights_only=True)
        assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old), name
    for f in TOKENIZER.iterdir():
        assert (tmp_path / "google" / "umt5-xxl" / f.name).read_bytes() == f.read_bytes(), f.name
    total = sum(f.stat().st_size for f in EMBEDDED.rglob("*") if f.is_file()
                and (f.suffix == ".pth" or "umt5-xxl" in f.parts))
    assert total < 5 * 2 ** 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embedded_encoder_on_cuda_matches_cpu():
    ref = TextEncoder.from_wan_dir(EMBEDDED).encode(PROMPTS)
    out = TextEncoder.from_wan_dir(EMBEDDED, device="cuda").encode(PROMPTS)
    assert out.context.is_cuda and out.lengths == ref.lengths and out.tokens == ref.tokens
    torch.testing.assert_close(out.context.cpu(), ref.context, rtol=1e-3, atol=1e-3)
    assert torch.all(out.context.cpu()[ref.context == 0] == 0)

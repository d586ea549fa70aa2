"""(Re)create the embedded text encoder and tokenizer of `data/embedded/`, deterministically from seeds; and
small random Wan VAEs for tests.

`data/embedded/` is a small *official-format Wan folder* (the DiT's config.json + safetensors and the students'
checkpoints come from training/zoo.py, the VAE from training/world_vae.py). This script writes the text
pieces, in the exact formats of the real Wan2.1-T2V-1.3B folder, so the same loading code serves both:

  models_t5_umt5-xxl-enc-bf16.pth   a tiny umT5 encoder in Wan's T5 key naming (wan/modules/t5.py), bf16:
                                    d_model 64 (= the embedded DiT's text_dim), 2 layers, 4 heads x d_kv 16,
                                    d_ff 128, 32 relative-position buckets per layer, vocab = the tokenizer's
  google/umt5-xxl/                  a tiny SentencePiece unigram tokenizer trained here on a built-in English
                                    corpus (~400 words of video-prompt vocabulary; the miniature world's
                                    words are whole tokens), with the files the real
                                    folder has: spiece.model, tokenizer.json, tokenizer_config.json,
                                    special_tokens_map.json (<pad>=0, </s>=1, <unk>=2, nmt_nfkc normalisation)

The umT5 weights are random (seeded): the DiTs learn to read the world's words from them (each of those words is
a token of its own, so their embeddings differ). `--random-vae` also writes a random tiny Wan2.1 VAE (Wan's key
naming, wan/modules/vae.py: z_dim 16, stride 4x8x8, the real layout with base_dim 2 instead of 96), the
embedded VAE before training/world_vae.py trained one. The module is importable: tests reuse
`wan_t5_state_dict`, `wan_vae_shapes` and `wan_vae_state_dict` to build other small Wan-named checkpoints, and
bench/bench_vae_t5.py reuses the `*_specs` functions to draw full-size weights directly on a GPU.
The Wan VAE names and shapes are enumerated here directly from Wan's constructors (Encoder3d/Decoder3d), not
through models/wan/vae.py, so they are an independent check of that module's key map.

Run:  .venv/bin/python data/embedded/make_text_and_vae.py [--out data/embedded] [--random-vae]
Running it twice gives byte-identical files (it prints their sha256).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
from collections import OrderedDict
from pathlib import Path

import torch

SEED_TOKENIZER = 1234
SEED_T5 = 2345
SEED_VAE = 3456

T5_SIZES = dict(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, num_buckets=32)
TOKENIZER_VOCAB = 384
VAE_SIZES = dict(base_dim=2, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                 temperal_downsample=(False, True, True))

# ----------------------------------------------------------------------------------------------------------
# Corpus: a few hundred distinct English words of the kind video prompts use
# ----------------------------------------------------------------------------------------------------------

SUBJECTS = """cat dog fox wolf bear deer horse rabbit squirrel owl eagle hawk sparrow parrot penguin dolphin whale
shark turtle octopus jellyfish butterfly bee dragon robot astronaut knight wizard dancer skater surfer runner
cyclist climber chef painter musician guitarist drummer child girl boy woman man grandmother grandfather couple
family crowd soldier pilot sailor fisherman farmer scientist detective samurai ninja princess king queen monkey
tiger lion elephant giraffe zebra panda koala kangaroo frog snake lizard crab lobster goldfish swan duck goose
car train bicycle motorcycle boat ship sailboat airplane helicopter balloon rocket spaceship truck bus tram""".split()
VERBS = """walks runs jumps flies swims dances sings plays climbs rides drives sails floats glides spins rolls
falls rises waves smiles laughs cries sleeps eats drinks reads writes paints cooks builds explores wanders
races chases hides searches watches looks turns stops sits stands kneels crawls dives splashes soars hovers
drifts wobbles bounces slides twirls marches""".split()
ADJECTIVES = """red orange yellow green blue purple pink white black golden silver brown gray bright dark glowing
shiny tiny huge small large old young ancient modern futuristic colorful misty foggy snowy rainy sunny cloudy
windy stormy calm quiet busy crowded empty peaceful magical mysterious cozy warm cold frozen wet dry dusty
sparkling soft fluffy furry wooden metal glass crystal neon vintage cinematic dramatic gentle playful happy
sad curious sleepy wild elegant""".split()
PLACES = """beach forest jungle desert mountain valley river lake ocean sea island cave waterfall meadow field
garden park city street alley rooftop bridge tunnel station airport harbor village castle palace temple
library kitchen bedroom classroom office factory market cafe restaurant stadium arena stage studio museum
highway road path trail canyon glacier volcano swamp prairie orchard vineyard farm barn lighthouse pier
subway skyline cathedral""".split()
TIMES = """sunrise sunset dawn dusk night midnight noon morning afternoon evening twilight winter spring summer
autumn""".split()
CAMERA = """camera pans tilts zooms tracks follows orbits slowly quickly smoothly aerial drone shot close up wide
angle view lens bokeh focus depth field slow motion timelapse handheld steady static overhead low high
tracking dolly crane sweeping panoramic macro portrait landscape frame light lighting shadows reflections
rays glow haze fog rain snow dust sparks fire smoke clouds stars moon sun sky water waves leaves flowers
grass trees petals bubbles""".split()
FILLERS = """a an the of in on at with through over under across along near behind beside into toward and while
as its""".split()
# The miniature world's words (models/world.py: COLOURS, SHAPES, DIRECTIONS and the words of its TEMPLATES):
# whole tokens of the tokenizer (SentencePiece user-defined pieces "▁word"), so that a prompt's colour, shape and
# direction each sit at a token of their own, for the DiT's cross-attention and for per-token studies.
WORLD_WORDS = ("red", "green", "blue", "yellow", "square", "circle", "left", "right", "up", "down",
               "a", "the", "moving", "slides", "moves", "across", "frame")


def corpus(seed: int, n_sentences: int = 4000) -> list[str]:
    """Deterministic prompt-like sentences using every word above."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        adj = " ".join(rng.sample(ADJECTIVES, rng.randint(1, 2)))
        s = (f"{rng.choice(['a', 'the', 'an old', 'a small'])} {adj} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} "
             f"{rng.choice(FILLERS)} {rng.choice(['a', 'the'])} {rng.choice(ADJECTIVES)} {rng.choice(PLACES)} "
             f"at {rng.choice(TIMES)}, {' '.join(rng.sample(CAMERA, rng.randint(2, 5)))}")
        out.append(s[0].upper() + s[1:] + rng.choice([".", "", "!"]))
    # every word at least once more, in a fixed order, so the vocabulary covers them all
    out += [" ".join(words) for words in (SUBJECTS, VERBS, ADJECTIVES, PLACES, TIMES, CAMERA, FILLERS)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokenizer (SentencePiece unigram, exported like the real google/umt5-xxl folder)
# ----------------------------------------------------------------------------------------------------------

def _proto_fields(buf: bytes):
    """Minimal protobuf wire-format reader: yields (field number, value) of one message level."""
    def varint(i):
        x = shift = 0
        while True:
            c = buf[i]
            i += 1
            x |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return x, i
    i = 0
    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def precompiled_charsmap(model_proto: bytes) -> bytes:
    """ModelProto.normalizer_spec (field 3) .precompiled_charsmap (field 2)."""
    for field, value in _proto_fields(model_proto):
        if field == 3:
            for f2, v2 in _proto_fields(value):
                if f2 == 2:
                    return v2
    return b""


def train_spm(sentences: list[str], vocab_size: int, seed: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc", character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2, user_defined_symbols=["▁" + w for w in WORLD_WORDS])
    return buf.getvalue()


def write_tokenizer(out_dir: Path, seed: int = SEED_TOKENIZER, vocab_size: int = TOKENIZER_VOCAB) -> int:
    """Write spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json; returns the vocab size."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    model_bytes = train_spm(corpus(seed), vocab_size, seed)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = [(sp.id_to_piece(i), 0.0 if sp.is_control(i) or sp.is_unknown(i) else float(sp.get_score(i)))
             for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(precompiled_charsmap(model_bytes))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spiece.model").write_bytes(model_bytes)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": []}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": 0, "additional_special_tokens": [], "model_max_length": 512, "sp_model_kwargs": {},
              "clean_up_tokenization_spaces": True}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sp.get_piece_size()


# ----------------------------------------------------------------------------------------------------------
# umT5 encoder in Wan's naming (wan/modules/t5.py T5Encoder with shared_pos=False)
# ----------------------------------------------------------------------------------------------------------

def wan_t5_specs(vocab: int, d_model: int, num_layers: int, num_heads: int, d_kv: int, d_ff: int,
                 num_buckets: int = 32, norm_jitter: float = 0.1,
                 pos_std: float = 0.5) -> "OrderedDict[str, tuple[tuple, float, float]]":
    """name -> (shape, mean, std) for every tensor of Wan's umT5 encoder, in module order. Roughly Wan's init
    (`init_weights`), with norm weights 1 + N(0, jitter^2) (so swapped norms are visible) and a stronger
    position bias than Wan's (2 buckets heads)^-1/2 (so wrong buckets are visible)."""
    inner = num_heads * d_kv
    specs = OrderedDict()
    specs["token_embedding.weight"] = ((vocab, d_model), 0.0, 1.0)                     # [V, D]
    for i in range(num_layers):
        p = f"blocks.{i}."
        specs[p + "norm1.weight"] = ((d_model,), 1.0, norm_jitter)                       # [D]
        specs[p + "attn.q.weight"] = ((inner, d_model), 0.0, (d_model * d_kv) ** -0.5)  # [H*dk, D]
        specs[p + "attn.k.weight"] = ((inner, d_model), 0.0, d_model ** -0.5)
        specs[p + "attn.v.weight"] = ((inner, d_model), 0.0, d_model ** -0.5)
        specs[p + "attn.o.weight"] = ((d_model, inner), 0.0, inner ** -0.5)             # [D, H*dk]
        specs[p + "norm2.weight"] = ((d_model,), 1.0, norm_jitter)
        specs[p + "ffn.gate.0.weight"] = ((d_ff, d_model), 0.0, d_model ** -0.5)        # [F, D]
        specs[p + "ffn.fc1.weight"] = ((d_ff, d_model), 0.0, d_model ** -0.5)           # [F, D]
        specs[p + "ffn.fc2.weight"] = ((d_model, d_ff), 0.0, d_ff ** -0.5)              # [D, F]
        specs[p + "pos_embedding.embedding.weight"] = ((num_buckets, num_heads), 0.0, pos_std)  # [buckets, H]
    specs["norm.weight"] = ((d_model,), 1.0, norm_jitter)
    return specs


def sample_specs(specs, seed: int, dtype=torch.float32) -> "OrderedDict[str, torch.Tensor]":
    """Draw mean + std * N(0, 1) for each spec in order from one seeded CPU generator (reproducible bytes)."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((name, (mean + std * torch.randn(shape, generator=g)).to(dtype))
                       for name, (shape, mean, std) in specs.items())


def wan_t5_state_dict(vocab: int, d_model: int, num_layers: int, num_heads: int, d_kv: int, d_ff: int,
                      num_buckets: int = 32, seed: int = SEED_T5, dtype=torch.float32,
                      norm_jitter: float = 0.1, pos_std: float = 0.5) -> "OrderedDict[str, torch.Tensor]":
    """Random Wan-named umT5 encoder weights (see `wan_t5_specs`)."""
    return sample_specs(wan_t5_specs(vocab, d_model, num_layers, num_heads, d_kv, d_ff, num_buckets,
                                     norm_jitter, pos_std), seed, dtype)


# ----------------------------------------------------------------------------------------------------------
# Wan2.1 VAE in Wan's naming (wan/modules/vae.py WanVAE_ = Encoder3d + conv1 + conv2 + Decoder3d)
# ----------------------------------------------------------------------------------------------------------

def _residual(prefix, in_dim, out_dim, shapes):
    """ResidualBlock: residual = [RMS_norm, SiLU, CausalConv3d 3x3x3, RMS_norm, SiLU, Dropout, CausalConv3d]."""
    shapes[prefix + "residual.0.gamma"] = (in_dim, 1, 1, 1)
    shapes[prefix + "residual.2.weight"] = (out_dim, in_dim, 3, 3, 3)
    shapes[prefix + "residual.2.bias"] = (out_dim,)
    shapes[prefix + "residual.3.gamma"] = (out_dim, 1, 1, 1)
    shapes[prefix + "residual.6.weight"] = (out_dim, out_dim, 3, 3, 3)
    shapes[prefix + "residual.6.bias"] = (out_dim,)
    if in_dim != out_dim:
        shapes[prefix + "shortcut.weight"] = (out_dim, in_dim, 1, 1, 1)
        shapes[prefix + "shortcut.bias"] = (out_dim,)


def _middle(prefix, dim, shapes):
    """middle = [ResidualBlock, AttentionBlock (RMS_norm images=True, to_qkv 1x1, proj 1x1), ResidualBlock]."""
    _residual(prefix + "middle.0.", dim, dim, shapes)
    shapes[prefix + "middle.1.norm.gamma"] = (dim, 1, 1)
    shapes[prefix + "middle.1.to_qkv.weight"] = (3 * dim, dim, 1, 1)
    shapes[prefix + "middle.1.to_qkv.bias"] = (3 * dim,)
    shapes[prefix + "middle.1.proj.weight"] = (dim, dim, 1, 1)
    shapes[prefix + "middle.1.proj.bias"] = (dim,)
    _residual(prefix + "middle.2.", dim, dim, shapes)


def wan_vae_shapes(base_dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                   temperal_downsample=(False, True, True)) -> "OrderedDict[str, tuple]":
    """Every parameter name and shape of Wan's `WanVAE_(dim=base_dim, z_dim, ...)`, in module order."""
    shapes: OrderedDict[str, tuple] = OrderedDict()
    # Encoder3d(dim, z_dim * 2, ...)
    dims = [base_dim * u for u in [1] + list(dim_mult)]
    shapes["encoder.conv1.weight"] = (dims[0], 3, 3, 3, 3)
    shapes["encoder.conv1.bias"] = (dims[0],)
    k = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            _residual(f"encoder.downsamples.{k}.", in_dim, out_dim, shapes)
            in_dim, k = out_dim, k + 1
        if i != len(dim_mult) - 1:
            shapes[f"encoder.downsamples.{k}.resample.1.weight"] = (out_dim, out_dim, 3, 3)
            shapes[f"encoder.downsamples.{k}.resample.1.bias"] = (out_dim,)
            if temperal_downsample[i]:
                shapes[f"encoder.downsamples.{k}.time_conv.weight"] = (out_dim, out_dim, 3, 1, 1)
                shapes[f"encoder.downsamples.{k}.time_conv.bias"] = (out_dim,)
            k += 1
    _middle("encoder.", dims[-1], shapes)
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    shapes["encoder.head.2.weight"] = (2 * z_dim, dims[-1], 3, 3, 3)
    shapes["encoder.head.2.bias"] = (2 * z_dim,)
    # quant convs
    shapes["conv1.weight"] = (2 * z_dim, 2 * z_dim, 1, 1, 1)
    shapes["conv1.bias"] = (2 * z_dim,)
    shapes["conv2.weight"] = (z_dim, z_dim, 1, 1, 1)
    shapes["conv2.bias"] = (z_dim,)
    # Decoder3d(dim, z_dim, dim_mult, num_res_blocks, temperal_upsample = temperal_downsample[::-1])
    temperal_upsample = list(temperal_downsample)[::-1]
    dims = [base_dim * u for u in [dim_mult[-1]] + list(dim_mult)[::-1]]
    shapes["decoder.conv1.weight"] = (dims[0], z_dim, 3, 3, 3)
    shapes["decoder.conv1.bias"] = (dims[0],)
    _middle("decoder.", dims[0], shapes)
    k = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            in_dim = in_dim // 2
        for _ in range(num_res_blocks + 1):
            _residual(f"decoder.upsamples.{k}.", in_dim, out_dim, shapes)
            in_dim, k = out_dim, k + 1
        if i != len(dim_mult) - 1:
            shapes[f"decoder.upsamples.{k}.resample.1.weight"] = (out_dim // 2, out_dim, 3, 3)
            shapes[f"decoder.upsamples.{k}.resample.1.bias"] = (out_dim // 2,)
            if temperal_upsample[i]:
                shapes[f"decoder.upsamples.{k}.time_conv.weight"] = (out_dim * 2, out_dim, 3, 1, 1)
                shapes[f"decoder.upsamples.{k}.time_conv.bias"] = (out_dim * 2,)
            k += 1
    shapes["decoder.head.0.gamma"] = (out_dim, 1, 1, 1)
    shapes["decoder.head.2.weight"] = (3, out_dim, 3, 3, 3)
    shapes["decoder.head.2.bias"] = (3,)
    return shapes


def wan_vae_specs(shapes, gain: float = 1.0, out_gain: float = 0.3) -> "OrderedDict[str, tuple[tuple, float, float]]":
    """name -> (shape, mean, std) for `wan_vae_shapes`: convs N(0, gain^2 / fan_in), biases N(0, 0.02^2), RMS
    gammas 1 + N(0, 0.1^2); the decoder's output conv is scaled by out_gain so most pixels stay inside [-1, 1]."""
    specs = OrderedDict()
    for name, shape in shapes.items():
        if name.endswith(".gamma"):
            specs[name] = (shape, 1.0, 0.1)
        elif name.endswith(".bias"):
            specs[name] = (shape, 0.0, 0.02)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            specs[name] = (shape, 0.0, gain * fan_in ** -0.5 * (out_gain if name == "decoder.head.2.weight" else 1.0))
    return specs


def wan_vae_state_dict(shapes, seed: int = SEED_VAE, dtype=torch.float32, gain: float = 1.0,
                       out_gain: float = 0.3) -> "OrderedDict[str, torch.Tensor]":
    """Random Wan-named VAE weights (see `wan_vae_specs`)."""
    return sample_specs(wan_vae_specs(shapes, gain, out_gain), seed, dtype)


# ----------------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_torch(sd, path: Path) -> None:
    """torch.save, atomically. (This script imports nothing of the repository, so that it runs as a plain file
    and stays an independent check of models/; elsewhere use models.files.atomic_torch_save.)"""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(sd), tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="the Wan folder to write into")
    ap.add_argument("--random-vae", action="store_true", help="also write a random base_dim-2 Wan2.1_VAE.pth")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok_dir = out / "google" / "umt5-xxl"
    vocab = write_tokenizer(tok_dir)
    t5 = wan_t5_state_dict(vocab=vocab, **T5_SIZES, dtype=torch.bfloat16)
    _save_torch(t5, out / "models_t5_umt5-xxl-enc-bf16.pth")
    files = [out / "models_t5_umt5-xxl-enc-bf16.pth"] + sorted(tok_dir.iterdir())
    if args.random_vae:
        _save_torch(wan_vae_state_dict(wan_vae_shapes(**VAE_SIZES), dtype=torch.float32), out / "Wan2.1_VAE.pth")
        files.append(out / "Wan2.1_VAE.pth")
    total = 0
    for f in files:
        total += f.stat().st_size
        print(f"{f.stat().st_size:>10,d}  {_sha256(f)[:16]}  {f.relative_to(out)}")
    print(f"{total:>10,d}  total bytes  (tokenizer vocab {vocab}, T5 {T5_SIZES})")


if __name__ == "__main__":
    main()

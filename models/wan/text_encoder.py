"""The umT5 text encoder of Wan2.1: prompts -> the DiT's cross-attention context [B, 512, 4096].

How it fits: the DiT reads `PromptEmbeddings.context`; the workbench reads `tokens`/`lengths` to label the 512
text keys of cross-attention. It knows nothing of the DiT.

What it loads: the official Wan folder's `models_t5_umt5-xxl-enc-bf16.pth` (a plain state dict in Wan's own T5
naming, `wan/modules/t5.py`) and its tokenizer folder `google/umt5-xxl/`, or a diffusers pipeline's text_encoder/
(transformers' own names, one file or shards) and tokenizer/ (models/wan/folder.py). The network is transformers'
`UMT5EncoderModel`; a key map renames Wan's tensors onto it (and transformers' names to Wan's on the way in):

    token_embedding.weight                     -> shared.weight (= encoder.embed_tokens.weight, tied)
    blocks.N.norm1.weight                      -> encoder.block.N.layer.0.layer_norm.weight
    blocks.N.attn.{q,k,v,o}.weight             -> encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.N.pos_embedding.embedding.weight    -> encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight
    blocks.N.norm2.weight                      -> encoder.block.N.layer.1.layer_norm.weight
    blocks.N.ffn.gate.0.weight                 -> encoder.block.N.layer.1.DenseReluDense.wi_0.weight  (GELU-tanh)
    blocks.N.ffn.fc1.weight                    -> encoder.block.N.layer.1.DenseReluDense.wi_1.weight  (linear)
    blocks.N.ffn.fc2.weight                    -> encoder.block.N.layer.1.DenseReluDense.wo.weight
    norm.weight                                -> encoder.final_layer_norm.weight

umT5 has its own relative position bias in every layer (Wan: shared_pos=False), 32 buckets, max distance 128,
no 1/sqrt(d) attention scaling, RMS norms with eps 1e-6, gated-GELU(tanh) FFN. All sizes (vocab, d_model, layers,
heads, d_kv, d_ff, buckets) are read from the tensor shapes, so the real umT5-XXL (256384 x 4096, 24 layers, 64
heads, d_ff 10240) and small test encoders load through the same code.

Semantics (Wan `T5EncoderModel.__call__` + Self-Forcing `WanTextEncoder`): clean each prompt (ftfy, html
unescape, collapse whitespace), tokenize with `</s>` appended, pad to text_len = 512 (truncate longer prompts,
keeping `</s>`), run the encoder with the padding mask, and set the rows past each prompt's length to zero.
The encoder runs only on the columns up to the batch's longest prompt: a padding token is never attended to
(masked), each real token's relative position bias depends only on its distance to another real token, and
every other operation is per token, so the real rows are the same as with all text_len columns (to float
rounding: the matrix shapes change) and a 20-token prompt costs 20 tokens of work, not 512.
Self-Forcing runs this encoder in float32 (bf16 weights upcast); that is the default dtype here.

Cache: with `cache_dir`, each prompt's embedding is stored once per (prompt, encoder identity, dtype, device - the
GPU model, or the CPU's instruction set and torch's thread count (the encoder's sums round otherwise at another
count) -, torch and transformers versions), where the identity is a sha256 over the
weights file, every tokenizer file, text_len and the cleaning mode; the entry also keeps the prompt's token pieces,
its token count and where a long prompt is cut. Writes are atomic, and a write that fails (a full disk) only warns.
An encoder made from files (`from_files`, `from_wan_dir`) loads its tokenizer and umT5 weights on first need:
prompts its cache holds are read without them (for umT5-XXL, 11 GB of weights not loaded; for any size,
transformers not imported: seconds of every command's start); files changed before that load are refused. Negative
prompts are encoded by a second `encode` call, the same way. `prompt_cache_dir()` is the commands' shared cache.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import CheckpointError, ModelInputError, ModelInputWarning
from models.files import (atomic_write_bytes, check_tensor_shapes, changed_files, check_unpickling, check_weights_file,
                          file_stamps, load_state_dict_file, safetensors_bytes, sha256_file, weight_files,
                          weights_sha256)
from models.wan.folder import T5_NAME as WEIGHTS_NAME  # noqa: F401 (the official file names, re-exported)
from models.wan.folder import TOKENIZER_SUBDIR, dit_dir, present, wan_parts  # noqa: F401 (TOKENIZER_SUBDIR: re-export)
DEFAULT_TEXT_LEN = 512
REL_MAX_DISTANCE = 128  # umT5 (and Wan's T5RelativeEmbedding default); not stored in the checkpoint
# umT5-XXL's settings that its weights do not record, the only ones built here (`infer_umt5_config`)
UMT5_FIXED = (("layer_norm_epsilon", 1e-6), ("relative_attention_max_distance", REL_MAX_DISTANCE),
              ("feed_forward_proj", "gated-gelu"))
_IDENTITY_VERSION = "wan-umt5-encoder/v1"


class TokenizerNotFoundError(CheckpointError):
    """The tokenizer folder is missing or unreadable."""


# ----------------------------------------------------------------------------------------------------------
# Key map Wan T5 <-> transformers UMT5EncoderModel
# ----------------------------------------------------------------------------------------------------------

_BLOCK_WAN_TO_HF = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_HF_TO_WAN = {v: k for k, v in _BLOCK_WAN_TO_HF.items()}
_TOP_WAN_TO_HF = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_TOP_HF_TO_WAN = {v: k for k, v in _TOP_WAN_TO_HF.items()}
_TOP_HF_TO_WAN["encoder.embed_tokens.weight"] = "token_embedding.weight"  # tied to shared.weight


def wan_to_hf_key(key: str) -> str:
    """Wan T5-encoder name -> UMT5EncoderModel name (KeyError for a name that is not Wan's)."""
    if key in _TOP_WAN_TO_HF:
        return _TOP_WAN_TO_HF[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m or m.group(2) not in _BLOCK_WAN_TO_HF:
        raise KeyError(f"not a Wan umT5 encoder key: {key!r}")
    return f"encoder.block.{m.group(1)}.{_BLOCK_WAN_TO_HF[m.group(2)]}"


def hf_to_wan_key(key: str) -> str:
    """UMT5EncoderModel name -> Wan name (the inverse of `wan_to_hf_key`; both embedding names -> one)."""
    if key in _TOP_HF_TO_WAN:
        return _TOP_HF_TO_WAN[key]
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if not m or m.group(2) not in _BLOCK_HF_TO_WAN:
        raise KeyError(f"not a UMT5EncoderModel key: {key!r}")
    return f"blocks.{m.group(1)}.{_BLOCK_HF_TO_WAN[m.group(2)]}"


def to_wan_names(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """A umT5 encoder state dict under Wan's names: as it is when it has them, renamed when it has transformers'
    (a diffusers pipeline's text_encoder/; the tied embedding's two names give one tensor)."""
    if not any(k == "shared.weight" or k.startswith("encoder.") for k in sd):
        return sd
    try:
        return {hf_to_wan_key(k): v for k, v in sd.items()}
    except KeyError as e:
        raise CheckpointError(f"{source}: {e.args[0]}") from None


def check_encoder_config(weights) -> None:
    """A transformers config.json beside the weights (a diffusers pipeline's text_encoder/, a umT5 folder): its
    settings that the weights do not record must be umT5-XXL's (`UMT5_FIXED`), or CheckpointError names them (they
    were not read: another epsilon or activation would have given other embeddings without a word). The config.json
    beside a Wan folder's .pth is the DiT's and is not looked at."""
    weights = Path(weights)
    path = weights.parent / "config.json"
    if weights.suffix == ".pth" or not path.is_file():
        return
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    bad = [f"{k} {raw[k]!r} (umT5-XXL: {v!r})" for k, v in UMT5_FIXED if isinstance(raw, dict) and k in raw
           and raw[k] != v]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)}: the text encoder is built with umT5-XXL's settings only")


def infer_umt5_config(sd: dict[str, torch.Tensor], source: str = "state dict"):
    """A transformers `UMT5Config` with every size read from the Wan-named tensors' shapes."""
    from transformers import UMT5Config

    if "pos_embedding.embedding.weight" in sd:
        raise CheckpointError(
            f"{source}: has one shared relative position bias (`pos_embedding.embedding.weight`): that is T5, "
            "not umT5 (umT5 has `blocks.N.pos_embedding` in every layer)")
    need = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight",
            "blocks.0.ffn.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(
            f"{source}: not a Wan umT5 encoder state dict: missing {missing} (first keys: {sorted(sd)[:6]})")
    vocab, d_model = sd["token_embedding.weight"].shape                     # [V, D]
    inner = sd["blocks.0.attn.q.weight"].shape[0]                           # [heads * d_kv, D]
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape    # [buckets, heads]
    d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]                           # [d_ff, D]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if inner % heads:
        raise CheckpointError(f"{source}: attention width {inner} is not a multiple of the {heads} heads")
    return UMT5Config(
        vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner // heads), d_ff=int(d_ff),
        num_layers=int(layers), num_heads=int(heads), relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=REL_MAX_DISTANCE, dropout_rate=0.0, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)


def build_umt5_encoder(sd: dict[str, torch.Tensor], source: str = "state dict"):
    """A transformers `UMT5EncoderModel` holding the Wan-named tensors of `sd` (assigned, not copied).

    Every tensor of `sd` must be used and every parameter filled with the right shape, or CheckpointError lists
    the missing / unexpected / mismatched keys."""
    from transformers import UMT5EncoderModel

    config = infer_umt5_config(sd, source)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    target = model.state_dict()
    wan_of = {h: hf_to_wan_key(h) for h in target}
    check_tensor_shapes({w: target[h].shape for h, w in wan_of.items()}, sd,
                        f"{source}: umT5 encoder weights do not match (layers {config.num_layers}, "
                        f"d_model {config.d_model}, heads {config.num_heads})")
    model.load_state_dict({h: sd[w] for h, w in wan_of.items()}, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # keep the tie: one embedding in memory
    return model


# ----------------------------------------------------------------------------------------------------------
# Prompt cleaning (Wan HuggingfaceTokenizer(clean='whitespace'))
# ----------------------------------------------------------------------------------------------------------

try:
    import ftfy as _ftfy
    CLEAN_MODE = f"ftfy-{getattr(_ftfy, '__version__', '?')}+html+whitespace"
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None
    CLEAN_MODE = "html+whitespace"
_warned_no_ftfy = False


def clean_prompt(text: str) -> str:
    """Wan's cleaning: ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs to one space."""
    global _warned_no_ftfy
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    elif not _warned_no_ftfy:
        warnings.warn("ftfy is not installed: prompts are cleaned without ftfy.fix_text (Wan uses it; ASCII prompts"
                      " are unaffected). `pip install ftfy` to match Wan exactly.", stacklevel=3)
        _warned_no_ftfy = True
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------------
# Hashing and atomic writes
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PromptEmbeddings:
    context: torch.Tensor       # [B, text_len, text_dim], zero past each prompt's length
    tokens: list[list[str]]     # per prompt, text_len strings: the token pieces, '' for padding
    lengths: list[int]          # number of real tokens per prompt (including the closing '</s>')


# the files a umT5 tokenizer folder reads its words from (one is enough)
VOCABULARY_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


def check_tokenizer_files(tokenizer_dir) -> None:
    """The tokenizer folder is there with a vocabulary file, or a clear error (cheap: nothing is loaded)."""
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise TokenizerNotFoundError(
            f"tokenizer folder not found: {tokenizer_dir} (expected the Wan folder's google/umt5-xxl/ with "
            "tokenizer.json, tokenizer_config.json, spiece.model, special_tokens_map.json)")
    vocab = [name for name in VOCABULARY_FILES if (tokenizer_dir / name).is_file()]
    if not vocab:  # (transformers then loads a tokenizer of its special tokens alone: every word became <unk>)
        held = sorted(p.name for p in tokenizer_dir.iterdir())
        shown = f"{held[:10]}" + (f" and {len(held) - 10} more" if len(held) > 10 else "")
        raise TokenizerNotFoundError(f"tokenizer folder {tokenizer_dir} has no vocabulary file (one of "
                                     f"{', '.join(VOCABULARY_FILES)}); it holds {shown}")


def load_tokenizer(tokenizer_dir):
    """transformers' AutoTokenizer from a local folder (the Wan folder's google/umt5-xxl), with clear errors."""
    check_tokenizer_files(tokenizer_dir)
    tokenizer_dir = Path(tokenizer_dir)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder name
        slow_only = (tokenizer_dir / "spiece.model").is_file() and not (tokenizer_dir / "tokenizer.json").is_file()
        hint = ("; the folder has spiece.model but no tokenizer.json, which transformers makes from it with "
                "protobuf and sentencepiece: pip install protobuf sentencepiece" if slow_only else "")
        raise TokenizerNotFoundError(f"cannot load the tokenizer in {tokenizer_dir}: {type(e).__name__}: {e}{hint}"
                                     ) from e
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise TokenizerNotFoundError(f"tokenizer in {tokenizer_dir} has no pad or eos token")
    return tok


def text_len_of(wan_dir) -> int:
    """The text length a Wan folder's encoder pads prompts to: `config.json`'s text_len (a pipeline's transformer/
    config.json), else 512."""
    cfg = dit_dir(wan_dir) / "config.json"
    if not cfg.is_file():
        return DEFAULT_TEXT_LEN
    try:
        return int(json.loads(cfg.read_text()).get("text_len", DEFAULT_TEXT_LEN))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read text_len from {cfg}: {e}") from e


def encoder_identity(weights_path, tokenizer_dir, text_len: int, *, hidden: bool = False) -> str:
    """What a text encoder's embeddings depend on, as one sha256: the weights file, every tokenizer file (name +
    sha256; hidden ones left out: an editor's swap file, a download tool's .cache/, which no tokenizer reads;
    `hidden`: with them, as stores made before 2026-12-06 hashed them), text_len and the cleaning mode. Files only
    (nothing is loaded); each file's hash is remembered once per machine (models/files.py `sha256_file`), so an
    11 GB umT5 file is read once, whoever asks."""
    tokenizer_dir = Path(tokenizer_dir)
    h = hashlib.sha256()
    h.update(f"{_IDENTITY_VERSION}\0weights={weights_sha256(weights_path)}\0".encode())
    for f in sorted(p for p in tokenizer_dir.rglob("*") if p.is_file() and (hidden or not _hidden(p, tokenizer_dir))):
        h.update(f"tokenizer:{f.relative_to(tokenizer_dir).as_posix()}={sha256_file(f)}\0".encode())
    h.update(f"text_len={text_len}\0clean={CLEAN_MODE}\0".encode())
    return h.hexdigest()


def check_encoder_files(wan_dir) -> None:
    """The text encoder's files of a Wan folder are there (the umT5 weights, every shard, and the tokenizer folder),
    or a clear error naming the missing (or truncated) one; cheap (no tensor is read), so commands call it before
    any work."""
    parts = wan_parts(wan_dir)
    if not present(parts.text_encoder):
        diffusers = "WanTransformer3DModel" in (parts.dit / "config.json").read_text() \
            if parts.layout == "official" and (parts.dit / "config.json").is_file() else False
        hint = ("; this is a diffusers transformer folder: give its pipeline folder (the one with "
                "model_index.json) as --wan-dir, or link the official Wan2.1 folder's "
                f"{WEIGHTS_NAME}, Wan2.1_VAE.pth and google/ beside its config.json" if diffusers else "")
        raise CheckpointError(f"text encoder weights {parts.describe('text_encoder')} do not exist{hint}")
    for path in weight_files(parts.text_encoder):
        check_weights_file(path, "text encoder weights")  # (a truncated or LFS file: said now)
    check_encoder_config(parts.text_encoder)
    if not parts.tokenizer.is_dir():
        raise TokenizerNotFoundError(
            f"tokenizer folder not found: {parts.describe('tokenizer')}, with tokenizer.json, tokenizer_config.json, "
            "spiece.model, special_tokens_map.json")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def wan_dir_encoder_identity(wan_dir) -> str:
    """`encoder_identity` of the text encoder `TextEncoder.from_wan_dir(wan_dir)` would load."""
    check_encoder_files(wan_dir)
    parts = wan_parts(wan_dir)
    return encoder_identity(parts.text_encoder, parts.tokenizer, text_len_of(wan_dir))


def earlier_identities(wan_dir) -> dict[str, str]:
    """{an identity earlier workbenches gave this text encoder: `wan_dir_encoder_identity`'s}: the one that hashed
    the tokenizer folder's hidden files too, when it has any (empty otherwise), so that their stores resume."""
    parts = wan_parts(wan_dir)
    if not any(_hidden(p, parts.tokenizer) for p in parts.tokenizer.rglob("*") if p.is_file()):
        return {}
    text_len = text_len_of(wan_dir)
    return {encoder_identity(parts.text_encoder, parts.tokenizer, text_len, hidden=True):
            encoder_identity(parts.text_encoder, parts.tokenizer, text_len)}


def prompt_cache_dir() -> Path | None:
    """The prompt cache the commands share (`extract`, `intervene`, `evaluate`, `train` and its ODE pairs, the zoo's
    check): prompts/ in the workbench's cache folder ($WORKBENCH_CACHE, else ~/.cache/sf-workbench; models/files.py);
    None where there is none, or where WORKBENCH_PROMPT_CACHE=0 turns it off."""
    import os

    from models.files import default_memo_dir

    root = default_memo_dir()
    return None if root is None or os.environ.get("WORKBENCH_PROMPT_CACHE") == "0" else root / "prompts"


class TextEncoder:
    """umT5 encoder + tokenizer; `encode(prompts)` gives the DiT's context. See the module docstring.

    `model` and `tokenizer` are built, or given (`load`: a function returning both, called on first need)."""

    def __init__(self, model, tokenizer, *, text_len: int, device, dtype, weights_path: Path | None = None,
                 tokenizer_dir: Path | None = None, cache_dir=None, load=None):
        if not isinstance(text_len, int) or text_len < 2:
            raise ModelInputError(f"text_len must be an int >= 2, got {text_len!r}")
        self.text_len = text_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None and self.weights_path is None:
            raise ModelInputError("a prompt cache needs the encoder's weights file (its identity); "
                                  "pass cache_dir=None for an encoder built from an in-memory state dict")
        self._identity: str | None = None
        self._warned: set[str] = set()  # prompts already warned about (truncation)
        self._cache_off = False  # (warned once: the weights are no longer the file's as loaded)
        self._model = self._tokenizer = None
        self._load = load
        self._cache_folder: Path | None = None  # (`_cache_path`'s folder, worked out once)
        # what the prompt cache's entries are entries of: the weights' and tokenizer's files' stamps, and once loaded
        # the parameters
        self._as_loaded = (file_stamps(self.weights_path, self.tokenizer_dir), None)
        if model is not None:
            self._adopt(model, tokenizer)

    def _adopt(self, model, tokenizer) -> None:
        vocab_rows = model.shared.weight.shape[0]
        if len(tokenizer) > vocab_rows:
            raise CheckpointError(
                f"tokenizer {self.tokenizer_dir} has {len(tokenizer)} tokens but the encoder weights "
                f"{self.weights_path} embed only {vocab_rows}: they do not belong together")
        if changed := changed_files(self._as_loaded[0]):  # (what the caller hashed for its labels is not what loaded)
            raise CheckpointError(f"text encoder files {', '.join(changed)} changed between the making of the "
                                  "encoder and the loading of its weights and tokenizer (at its first prompt not in "
                                  "the prompt cache); run again")
        self._model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._tokenizer = tokenizer
        self._as_loaded = self._weights_state()

    def _load_now(self) -> None:
        with torch.inference_mode(False):  # (weights made under a caller's inference mode keep no version counter)
            self._adopt(*self._load())

    @property
    def model(self):
        """transformers' UMT5EncoderModel, loaded on first use for an encoder made from files."""
        if self._model is None:
            self._load_now()
        return self._model

    @property
    def tokenizer(self):
        """The umT5 tokenizer (transformers), loaded with the model."""
        if self._tokenizer is None:
            self._load_now()
        return self._tokenizer

    @property
    def text_dim(self) -> int:
        return int(self.model.config.d_model)

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_wan_dir(cls, wan_dir, device="cpu", dtype=torch.float32, cache_dir=None, text_len: int | None = None,
                     trust_pickle: bool = False) -> "TextEncoder":
        """From a Wan folder: `<wan_dir>/models_t5_umt5-xxl-enc-bf16.pth` and `<wan_dir>/google/umt5-xxl/`, or a
        diffusers pipeline's text_encoder/ and tokenizer/ (models/wan/folder.py). text_len: argument, else
        `config.json`'s text_len, else 512."""
        wan_dir = Path(wan_dir)
        if not wan_dir.is_dir():
            raise CheckpointError(f"Wan model folder not found: {wan_dir}")
        check_encoder_files(wan_dir)  # (what is missing, named where this layout keeps it)
        if text_len is None:
            text_len = text_len_of(wan_dir)
        parts = wan_parts(wan_dir)
        return cls.from_files(parts.text_encoder, parts.tokenizer, device=device, dtype=dtype,
                              cache_dir=cache_dir, text_len=text_len, trust_pickle=trust_pickle)

    @classmethod
    def from_files(cls, weights, tokenizer_dir, device="cpu", dtype=torch.float32, cache_dir=None,
                   text_len: int = DEFAULT_TEXT_LEN, trust_pickle: bool = False) -> "TextEncoder":
        """From a umT5 weights file (.pth or .safetensors, or the .index.json of safetensors shards; Wan's names or
        transformers') and a tokenizer folder."""
        check_tokenizer_files(tokenizer_dir)  # checked first: cheap, and the commonest missing piece
        check_encoder_config(weights)
        for path in weight_files(weights):
            check_weights_file(path, "text encoder weights")  # (a missing, truncated or LFS file: said now)
            if cache_dir is not None and not trust_pickle:  # (loaded later, at the first prompt the cache lacks: a
                check_unpickling(path)  # file that needs --trust-pickle is said now, its tensors mapped, not read)

        def load():
            tokenizer = load_tokenizer(tokenizer_dir)
            sd = to_wan_names(load_state_dict_file(weights, trust_pickle=trust_pickle), str(weights))
            return build_umt5_encoder(sd, source=str(weights)), tokenizer

        encoder = cls(None, None, text_len=text_len, device=device, dtype=dtype, weights_path=Path(weights),
                      tokenizer_dir=Path(tokenizer_dir), cache_dir=cache_dir, load=load)
        if cache_dir is None:  # (nothing to read instead: loaded now, where a bad file is said before any work)
            encoder._load_now()
        return encoder

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], tokenizer_dir, device="cpu", dtype=torch.float32,
                        text_len: int = DEFAULT_TEXT_LEN) -> "TextEncoder":
        """From an in-memory Wan-named state dict (benchmarks, tests); tensors are assigned, then moved once.
        No prompt cache (there is no file to identify the encoder by)."""
        tokenizer = load_tokenizer(tokenizer_dir)
        model = build_umt5_encoder(sd)
        return cls(model, tokenizer, text_len=text_len, device=device, dtype=dtype, tokenizer_dir=Path(tokenizer_dir))

    # -- identity and cache ----------------------------------------------------------------------------------
    @property
    def identity(self) -> str:
        """sha256 over the weights file, every tokenizer file (name + sha256), text_len and the cleaning mode."""
        if self._identity is None:
            if self.weights_path is None or self.tokenizer_dir is None:
                raise ModelInputError("this encoder was built from memory and has no file identity")
            self._identity = encoder_identity(self.weights_path, self.tokenizer_dir, self.text_len)
        return self._identity

    def _weights_state(self) -> tuple:
        """The weights' and tokenizer's files' stamps (models/files.py `file_stamps`) and each parameter's address and
        version counter (an in-place write, e.g. `load_state_dict`, bumps it); None for the parameters before they
        are loaded."""
        files = file_stamps(self.weights_path, self.tokenizer_dir)  # (a shard index: its shards too)
        params = None if self._model is None else tuple((p.data_ptr(), p._version) for p in self._model.parameters())
        return files, params

    def _cache_usable(self) -> bool:
        """Whether the prompt cache holds this encoder's embeddings: its identity is the weights file's, so once the
        file was replaced after loading, or the weights changed in memory, the cache is neither read nor written
        (a ModelInputWarning says so once; entries of other weights were stored under the new file's identity)."""
        files, params = self._as_loaded
        changed = changed_files(files)
        if self._weights_state()[1] == params and not changed:
            return True
        if not self._cache_off:
            self._cache_off = True
            what = (f"its tokenizer files are no longer those of {self.tokenizer_dir}" if changed and
                    all(Path(f).parent == self.tokenizer_dir for f in changed) else
                    f"its weights are no longer those of {self.weights_path}")
            warnings.warn(f"text encoder: {what} as loaded (a file was replaced, or the weights were changed in "
                          f"memory): the prompt cache in {self.cache_dir} is not used; load the encoder again to use "
                          "it", ModelInputWarning, stacklevel=3)
        return False

    def _cache_path(self, prompt: str) -> Path:
        """One file per prompt, in a folder per encoder identity, dtype, device type and the device, torch and
        transformers that computed it (another GPU, CPU instruction set, CPU thread count or version may round
        otherwise: its entries are its own, in a cache folder that machines and runs share; a prompt's embedding is
        then the same whichever run encoded it first)."""
        if self._cache_folder is None:
            from importlib.metadata import version

            dtype_name = str(self.dtype).replace("torch.", "")
            device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
                f"{torch.backends.cpu.get_cpu_capability()} threads {torch.get_num_threads()}" \
                if self.device.type == "cpu" else self.device.type
            runtime = hashlib.sha256(f"torch={torch.__version__}\0transformers={version('transformers')}\0"
                                     f"device={device}".encode())
            self._cache_folder = self.cache_dir / (f"umt5-{self.identity[:32]}-{dtype_name}-{self.device.type}-"
                                                   f"{runtime.hexdigest()[:8]}")
        return self._cache_folder / f"{hashlib.sha256(prompt.encode('utf-8')).hexdigest()}.safetensors"

    def _cache_get(self, prompt: str):
        """(context [text_len, D] on device, tokens, length, (token count before truncation, the text before the
        cut)) or None."""
        from safetensors import safe_open
        path = self._cache_path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                real = f.get_tensor("context")                       # [length, D]
            if meta.get("prompt") != prompt or meta.get("identity") != self.identity:
                return None
            length, tokens = int(meta["length"]), json.loads(meta["tokens"])
            count = (int(meta["count"]), meta["cut_after"])
        except Exception:  # noqa: BLE001 - a damaged (or older) entry is recomputed and overwritten
            return None
        context = torch.zeros(self.text_len, real.shape[-1], dtype=self.dtype, device=self.device)
        context[:length] = real.to(device=self.device, dtype=self.dtype)
        return context, tokens, length, count

    def _cache_put(self, prompt: str, context: torch.Tensor, tokens: list[str], length: int,
                   count: tuple[int, str]) -> None:
        meta = {"prompt": prompt, "identity": self.identity, "length": str(length), "tokens": json.dumps(tokens),
                "text_len": str(self.text_len), "count": str(count[0]), "cut_after": count[1]}
        # (the header's keys in sorted order: one prompt, one file's bytes, from run to run)
        data = safetensors_bytes({"context": context[:length].detach().to("cpu").contiguous()}, metadata=meta)
        try:
            atomic_write_bytes(self._cache_path(prompt), data)
        except OSError as err:  # (a full disk, a read-only cache: the run goes on without the entry)
            if not self._cache_off:
                self._cache_off = True
                warnings.warn(f"text encoder: cannot write the prompt cache in {self.cache_dir} ({err}); encoding "
                              "goes on without it", ModelInputWarning, stacklevel=4)

    # -- encoding --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]):
        """prompts -> (context [n, L, D] zero past each length, tokens, lengths), no cache."""
        L = self.text_len
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                               max_length=L, add_special_tokens=True, return_tensors="pt")
        ids = batch["input_ids"]                                     # [n, L]
        mask = batch["attention_mask"]                               # [n, L], 1 = real token
        if ids.shape[1] != L:
            raise ModelInputError(f"tokenizer returned {ids.shape[1]} tokens per prompt, expected text_len {L}")
        lengths = [int(n) for n in mask.sum(dim=1)]
        used = max(lengths)                                          # columns past it are padding in every row
        hidden = self.model(input_ids=ids[:, :used].to(self.device),
                            attention_mask=mask[:, :used].to(self.device)).last_hidden_state  # [n, used, D]
        keep = mask[:, :used].to(self.device).bool()[:, :, None]     # [n, used, 1]
        context = torch.zeros(len(prompts), L, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        context[:, :used] = hidden.masked_fill(~keep, 0)
        tokens = [self.tokenizer.convert_ids_to_tokens(row[:n].tolist()) + [""] * (L - n)
                  for row, n in zip(ids, lengths)]
        return context, tokens, lengths

    def warn_if_truncated(self, prompts: list[str], known: dict[str, tuple[int, str]] | None = None) -> list[tuple]:
        """(token count, `</s>` included, before truncation; the text before the cut, '' for a prompt that fits) of
        each prompt; a ModelInputWarning for each one longer than text_len, saying where the encoder cuts it. A
        warning, not an error: Wan2.1 and Self-Forcing truncate such prompts the same way, so the model sees what the
        Wan2.1 and Self-Forcing pipelines would show it. `known`: what the prompt cache holds of some prompts (their
        tokenizer is then not needed)."""
        L = self.text_len
        found = []
        for p in prompts:
            if known and p in known:
                count, tail = known[p]
            else:
                ids = self.tokenizer(clean_prompt(p), add_special_tokens=True, truncation=False,
                                     verbose=False)["input_ids"]
                count, tail = len(ids), self.tokenizer.decode(ids[max(0, L - 9):L - 1]).strip() if len(ids) > L else ""
            found.append((count, tail))
            if count > L and p not in self._warned:
                self._warned.add(p)
                warnings.warn(f"prompt {p[:40]!r}... has {count} tokens; the text encoder reads the first {L} "
                              f"(as Wan2.1 does), so it is cut after '...{tail}'", ModelInputWarning, stacklevel=3)
        return found

    def encode(self, prompts: list[str], batch_size: int = 8) -> PromptEmbeddings:
        """prompts -> PromptEmbeddings(context [B, text_len, text_dim], tokens, lengths), in prompt order.

        Each prompt is encoded on its own padded row, so the result does not depend on the other prompts of
        the batch; with a cache_dir, prompts already encoded by this encoder are read from disk."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ModelInputError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ModelInputError(f"prompts must be strings; items {bad[:10]} are not")
        if batch_size < 1:
            raise ModelInputError(f"batch_size must be >= 1, got {batch_size}")
        results: dict[str, tuple] = {}
        todo = []
        cached = self.cache_dir is not None and self._cache_usable()
        for p in dict.fromkeys(prompts):  # unique, in order
            hit = self._cache_get(p) if cached else None
            if hit is not None:
                results[p] = hit
            else:
                todo.append(p)
        counts = dict(zip(prompts, self.warn_if_truncated(prompts, {p: hit[3] for p, hit in results.items()})))
        results = {p: hit[:3] for p, hit in results.items()}
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            context, tokens, lengths = self._encode_uncached(chunk)
            for i, p in enumerate(chunk):
                results[p] = (context[i], tokens[i], lengths[i])
                if cached and not self._cache_off:
                    self._cache_put(p, context[i], tokens[i], lengths[i], counts[p])
        return PromptEmbeddings(context=torch.stack([results[p][0] for p in prompts]),
                                tokens=[list(results[p][1]) for p in prompts],
                                lengths=[results[p][2] for p in prompts])

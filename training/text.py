"""Prompt embeddings for training: the model folder's umT5 encoder, cached per prompt, or a seeded stand-in.

`PromptCache` wraps any encoder with `encode(prompts) -> PromptEmbeddings` and keeps each prompt's embedding
(on the device, in the compute dtype) after its first use, so the negative prompt and repeated prompts are
encoded once. `HashTextEncoder` gives each prompt a fixed pseudo-random embedding (seeded by the prompt's
sha256): tests and benchmarks use it where no text encoder exists for the model size.
"""

from __future__ import annotations

import hashlib

import torch

from models.wan.text_encoder import PromptEmbeddings


class HashTextEncoder:
    """prompt -> a seeded N(0, 1) context [text_len, text_dim], rows past a prompt's word count set to zero."""

    def __init__(self, text_len: int, text_dim: int, device="cpu"):
        self.text_len, self.text_dim, self.device = text_len, text_dim, device

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        rows, tokens, lengths = [], [], []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:15], 16))
            n = min(len(p.split()) + 1, self.text_len)
            ctx = torch.randn(self.text_len, self.text_dim, generator=g)
            ctx[n:] = 0
            rows.append(ctx)
            tokens.append(p.split()[: n - 1] + ["</s>"] + [""] * (self.text_len - n))
            lengths.append(n)
        return PromptEmbeddings(context=torch.stack(rows).to(self.device), tokens=tokens, lengths=lengths)


class PromptCache:
    """encode(prompts) -> context [B, text_len, text_dim] on `device` in `dtype`, each prompt encoded once."""

    def __init__(self, encoder, device, dtype, max_items: int = 4096):
        self.encoder, self.device, self.dtype, self.max_items = encoder, device, dtype, max_items
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            if len(self._cache) + len(todo) > self.max_items:
                self._cache.clear()  # (full: this batch's prompts all encoded again)
                todo = list(dict.fromkeys(prompts))
            with torch.no_grad():
                emb = self.encoder.encode(todo)
            for p, c in zip(todo, emb.context):
                self._cache[p] = c.to(self.device, self.dtype)
        return torch.stack([self._cache[p] for p in prompts])

    def embeddings(self, prompts: list[str]) -> PromptEmbeddings:
        """Full embeddings (tokens and lengths too), for probe stores."""
        with torch.no_grad():
            emb = self.encoder.encode(list(prompts))
        return PromptEmbeddings(context=emb.context.to(self.device, self.dtype), tokens=emb.tokens, lengths=emb.lengths)

"""The Self-Forcing training rollout (their `inference_with_trajectory`): gradient reaches only the exit-step
forwards, the KV cache seen with gradients equals the one seen without, activation checkpointing changes nothing (when
the text keys/values' gradient does not follow it), and the denoising schedule is the inference rollout's.
The researchers' gradient through the in-place-written cache and their checkpointing's text gradient are
pinned in tests/test_training_parity.py; here the cleaner semantics (detached cache) unless said otherwise."""

import pytest
import torch

from conftest import tiny_model
from models.common.kv_cache import CrossCache, RolloutCache
from models.common.rollout import _to_model, causal_few_step
from models.common.scheduler import FlowMatchScheduler
from training import rng
from training.rollout import draw_exit_indices, self_forcing_rollout

B, F, C, H, W = 2, 9, 16, 4, 6
SCHED = FlowMatchScheduler(5.0)
STEPS = SCHED.warp([1000, 750, 500, 250])


pytestmark = pytest.mark.usefixtures("one_thread")


def setup(window=None, seed=0):
    model = tiny_model(**(window or {}))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, F, C, H, W, generator=g)
    context = torch.randn(B, 16, 32, generator=g)
    return model, noise, context


def gens(seed=1):
    return rng.sample_generators(seed, 0, "test", range(B))


class Recorder:
    """Forward pre-hook: the inputs of every generator forward, and whether its output has gradient."""

    def __init__(self, model):
        self.calls = []
        self.h1 = model.register_forward_pre_hook(self.pre, with_kwargs=True)
        self.h2 = model.register_forward_hook(self.post, with_kwargs=True)

    def pre(self, module, args, kwargs):
        self.calls.append(dict(x=args[0].detach().clone(), t=args[1].clone(), start=kwargs["start_frame"],
                               labels=kwargs["labels"], grad=torch.is_grad_enabled()))

    def post(self, module, args, kwargs, out):
        self.calls[-1]["out_grad"] = out.requires_grad

    def remove(self):
        self.h1.remove(), self.h2.remove()


def rollout(model, noise, context, exit_k, **kw):
    n = F // model.num_frame_per_block
    return self_forcing_rollout(model, noise, context, timesteps=STEPS, scheduler=SCHED, exit_indices=[exit_k] * n,
                                gens=gens(), **kw)


def param_grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def reference_grads(model, calls, context, weight):
    """Each chunk's exit forward alone: a fresh cache filled (no grad) by the recorded context passes of the
    earlier chunks, then the recorded exit input with gradient. Sum of sum(weight * x0) over chunks."""
    model.zero_grad()
    exits = [c for c in calls if c["labels"].phase == "train"]
    contexts = [c for c in calls if c["labels"].phase == "context"]
    allocate = lambda: RolloutCache.allocate(model.config, B, F, (H // 2) * (W // 2), dtype=torch.float32, device="cpu")
    text = allocate()  # the text keys/values, computed without gradient (the rollout's first forward had none)
    with torch.no_grad():
        model(calls[0]["x"], calls[0]["t"], context, cache=text, start_frame=0)
    for b, ex in enumerate(exits):
        cache = allocate()
        cache.cross = [CrossCache(c.k, c.v) for c in text.cross]
        with torch.no_grad():
            for c in contexts[:b]:
                model(c["x"], c["t"], context, cache=cache, start_frame=c["start"])
        flow = model(ex["x"], ex["t"], context, cache=cache, start_frame=ex["start"])
        x = ex["x"].permute(0, 2, 1, 3, 4)
        x0 = SCHED.x0_from_flow(flow.permute(0, 2, 1, 3, 4), x, ex["t"])
        s = ex["start"]
        (weight[:, s : s + 3] * x0).sum().backward()
    return param_grads(model)


@pytest.mark.parametrize("window,checkpointing", [(None, False), (None, True),
                                                  (dict(local_attn_size=6, sink_size=1), True)])
def test_gradient_only_through_exit_step_forwards(window, checkpointing):
    model, noise, context = setup(window)
    model.gradient_checkpointing = checkpointing
    weight = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(5))
    rec = Recorder(model)
    out = rollout(model, noise, context, exit_k=2, kv_gradient="detached", text_kv_gradient="first_forward")
    rec.remove()
    (weight * out).sum().backward()
    got = param_grads(model)
    # exactly one forward per chunk builds a graph: the exit step (k = 2); every other forward has no gradient
    n_chunks = F // 3
    assert len(rec.calls) == n_chunks * (2 + 1) + n_chunks  # 3 denoising forwards + the context pass per chunk
    graphs = [(c["labels"].chunk, c["labels"].step) for c in rec.calls if c["out_grad"]]
    assert graphs == [(b, 2) for b in range(n_chunks)]
    assert all(c["labels"].phase == "train" for c in rec.calls if c["out_grad"])
    # the gradient is the sum of the exit forwards' own gradients: nothing flows through earlier chunks' outputs
    # or the context passes (which wrote the cache these forwards read)
    model.gradient_checkpointing = False
    ref = reference_grads(model, rec.calls, context, weight)
    assert any(g.abs().sum() > 0 for g in got.values())
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kv_gradient", ["detached", "inplace"])
def test_what_gradient_reaches_earlier_chunks(kv_gradient):
    """Exit at step 0, so each chunk's exit input is its own noise. A loss on chunk 1: chunk 0's exit output
    receives only the zero slice of the concatenation, and chunk 2's noise nothing. Chunk 0's noise (whose
    clean prediction fills the cache chunk 1 reads) gets no gradient with a detached cache; with the
    researchers' in-place cache it does, through chunk 0's exit-step keys/values."""
    model, noise, context = setup()
    noise = noise.requires_grad_(True)
    seen = []

    def grab(module, args, kwargs, out):
        if out.requires_grad and kwargs["labels"].chunk == 0:
            out.register_hook(lambda g: seen.append(g.abs().max().item()))

    h = model.register_forward_hook(grab, with_kwargs=True)
    out = rollout(model, noise, context, exit_k=0, kv_gradient=kv_gradient)
    h.remove()
    out[:, 3:6].sum().backward()
    assert seen and all(v == 0 for v in seen)
    assert noise.grad[:, 6:].abs().max() == 0 and noise.grad[:, 3:6].abs().max() > 0
    assert (noise.grad[:, :3].abs().max() > 0) == (kv_gradient == "inplace")


def test_cross_attention_keys_have_gradient_only_when_the_first_forward_is_the_exit():
    """The researchers' cache semantics: text keys/values are computed by the first forward (chunk 0, step 0)
    and reused, so the text embedding gets gradient iff that forward is the exit step."""
    for exit_k, expect in ((0, True), (2, False)):
        model, noise, context = setup()
        rollout(model, noise, context, exit_k=exit_k).sum().backward()
        g = model.text_embedding[0].weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect


def test_values_with_gradient_equal_values_without():
    model, noise, context = setup()
    with_grad = rollout(model, noise, context, exit_k=1)
    with torch.no_grad():
        without = rollout(model, noise, context, exit_k=1, grad=False)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(with_grad.detach(), without, rtol=0, atol=1e-6)


def test_denoising_matches_the_inference_rollout():
    """With the exit at the last step the first chunk is exactly inference's first chunk (same steps, same
    re-noising draws). (Later chunks differ: training re-noises the context pass's input at the grid's last
    timestep, sigma 0.00498, and that draw shifts the generator.)"""
    model, noise, context = setup()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        train = self_forcing_rollout(model, noise[:1], context[:1], timesteps=STEPS, scheduler=SCHED,
                                     exit_indices=[3] * 3, gens=[g], grad=False)
        infer = causal_few_step(model, noise[:1], context[:1], timesteps=STEPS, scheduler=SCHED,
                                generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(train[:, :3], infer[:, :3], rtol=0, atol=1e-6)


def test_exit_indices_are_uniform_and_shared():
    draws = [draw_exit_indices(0, s, "gen/exit", 7, 4, shared=True, last_step_only=False) for s in range(400)]
    assert all(len(set(d)) == 1 for d in draws)  # one index for every chunk
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=4)
    assert counts.min() > 70  # uniform over the 4 steps (expected 100 each)
    per_chunk = draw_exit_indices(0, 3, "gen/exit", 7, 4, shared=False, last_step_only=False)
    assert len(per_chunk) == 7
    assert draw_exit_indices(0, 3, "gen/exit", 7, 4, shared=True, last_step_only=True) == [3] * 7


@pytest.mark.parametrize("kv_gradient,exit_k", [("detached", 0), ("inplace", 0), ("inplace", 2)])
def test_gradient_checkpointing_recompute_sees_the_forward_cache(kv_gradient, exit_k):
    """Backward with activation checkpointing runs after every chunk has written the cache: the recompute
    must see the window of the original forward (GradWindow), so gradients equal the plain ones (with text
    keys/values whose gradient does not depend on checkpointing)."""
    grads = []
    for ckpt in (False, True):
        model, noise, context = setup()
        model.gradient_checkpointing = ckpt
        rollout(model, noise, context, exit_k=exit_k, kv_gradient=kv_gradient,
                text_kv_gradient="every_exit").pow(2).sum().backward()
        grads.append(param_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_model_input_layout():
    model, noise, context = setup()
    assert _to_model(noise).shape == (B, C, F, H, W)


def test_inference_attends_to_the_cache_buffer_itself():
    """Without gradients the KV cache is not wrapped: attention reads the cache's own buffer (no copy), as the
    inference rollout always did."""
    from workbench.hooks import CallFilter, Probe, attach

    model, noise, context = setup()
    seen = []
    probe = Probe(CallFilter(layers={0}, kinds={"self"}), fn=lambda call, q, k, v, out, lse: seen.append(k))
    cache = RolloutCache.allocate(model.config, B, F, (H // 2) * (W // 2), dtype=torch.float32, device="cpu")
    with torch.no_grad(), attach(model, probe):
        model(_to_model(noise[:, :3]), torch.full((B, 3), 500.0), context, cache=cache, start_frame=0)
    assert seen[0].data_ptr() == cache.kv[0].k.data_ptr()
    seen.clear()
    with attach(model, probe):  # with gradients: cat(past, new), a new tensor that carries the gradient
        model(_to_model(noise[:, 3:6]), torch.full((B, 3), 500.0), context, cache=cache, start_frame=3)
    assert seen[0].data_ptr() != cache.kv[0].k.data_ptr() and seen[0].requires_grad
    torch.testing.assert_close(seen[0].detach(), cache.kv[0].k[:, : seen[0].shape[1]])  # the values are the cache's

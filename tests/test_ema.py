"""training/ema.py: the shadow the trainer saves is the one `update` moves, also after `load_full` (a resume), and
frozen parameters have no shadow; checked against the recurrence in float64."""

import torch

from training.ema import EMA


def params(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.nn.Parameter(torch.randn(4, 3, generator=g)),
            "b": torch.nn.Parameter(torch.randn(3, generator=g)),
            "frozen": torch.nn.Parameter(torch.randn(2, generator=g), requires_grad=False)}


def step(ps, seed):
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in ps.values():
            p.add_(torch.randn(p.shape, generator=g))


def test_saved_shadow_follows_the_recurrence_and_a_loaded_state():
    ps = params(0)
    ema = EMA(ps.items(), 0.9)
    assert sorted(ema.full_state_dict()) == ["b", "w"]  # frozen parameters have no shadow
    ref = {n: ps[n].detach().double().clone() for n in ("w", "b")}
    for i in range(3):
        step(ps, i)
        ema.update()
        ref = {n: 0.9 * ref[n] + 0.1 * ps[n].detach().double() for n in ref}
    saved = ema.full_state_dict()
    for n in ref:
        torch.testing.assert_close(saved[n].double(), ref[n], rtol=1e-6, atol=1e-6)
    # a resume: a fresh EMA made from other parameters, loaded, then updated, is the same recurrence
    other = EMA(params(1).items(), 0.9)
    other.load_full(saved)
    step(ps, 7)
    other.params = [(n, ps[n]) for n, _ in other.params]  # (the resumed trainer's parameters)
    other.update()
    for n in ref:
        expected = 0.9 * saved[n].double() + 0.1 * ps[n].detach().double()
        torch.testing.assert_close(other.full_state_dict()[n].double(), expected, rtol=1e-6, atol=1e-6)

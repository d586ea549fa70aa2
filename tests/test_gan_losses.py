"""The GAN losses of training/gan.py written out in float64: the relativistic losses' directions, and the
finite-difference penalties at half weight in the critic's loss."""

import pytest
import torch

from test_gan import gan_trainer, world_set  # noqa: F401
from training.gan import discriminator_gan_loss, generator_gan_loss


def test_relativistic_losses_push_fake_above_real_for_the_generator_and_below_for_the_critic():
    g = torch.Generator().manual_seed(0)
    fake, real = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g) + 1.0
    sp = lambda z: torch.log1p(torch.exp(z.double()))  # noqa: E731
    torch.testing.assert_close(generator_gan_loss(fake, real, 0.7, True).double(), 0.7 * sp(-(fake - real)).mean())
    torch.testing.assert_close(discriminator_gan_loss(fake, real, 0.7, True).double(), 0.7 * sp(-(real - fake)).mean())
    torch.testing.assert_close(generator_gan_loss(fake, real, 0.7, False).double(), 0.7 * sp(-fake).mean())
    # the generator's loss falls as its logits rise past the real ones
    assert generator_gan_loss(fake + 1, real, 1.0, True) < generator_gan_loss(fake, real, 1.0, True)


def test_finite_difference_penalties_enter_the_critic_loss_at_half_weight(tmp_path, world_set, monkeypatch):
    """With a linear discriminator D(x) = sum(x) the finite-difference penalty ((D(x + s e) - D(x)) / s)^2 does not
    depend on s; the critic loss is the GAN loss plus 0.5 (r1 + r2)."""
    import training.gan as gan

    monkeypatch.setattr(gan, "classify", lambda critic, x, t, ctx: x.double().flatten(1).sum(1, keepdim=True))
    pens = []
    for sigma in (0.5, 0.05):
        over = ["gan_d_weight=1.0", "r1_weight=0.1", "r2_weight=0.2", f"r1_sigma={sigma}", f"r2_sigma={sigma}"]
        tr = gan_trainer(tmp_path / str(sigma), world_set, *over)
        loss, logs = tr.critic_loss(0)
        d = discriminator_gan_loss(logs["gan_fake_logit"].reshape(1, 1), logs["gan_real_logit"].reshape(1, 1), 1.0,
                                   tr.cfg.relativistic_discriminator)
        torch.testing.assert_close(loss.double(), d.double() + 0.5 * (logs["r1_loss"] + logs["r2_loss"]).double())
        pens.append(float(logs["r1_loss"]))
    assert pens[0] == pytest.approx(pens[1], rel=1e-3)

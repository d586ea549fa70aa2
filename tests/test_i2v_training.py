"""Image-to-video training (`i2v: true`): text-image pairs from the miniature world (training/i2v.py), the
training rollout that starts from the image's latent, a DMD step on them, and the shipped config."""

import numpy as np
import pytest
import torch

from workbench.hooks import CallFilter, Probe, attach

pytestmark = pytest.mark.usefixtures("one_thread")


def test_world_image_pairs_are_the_encoded_first_frames(tmp_path):
    from models.wan.embedded import EMBEDDED_DIR
    from models.wan.vae import WanVAE
    from models.world import dataset_item, world_video
    from training.data import LatentDataset
    from training.i2v import make_world_image_pairs

    path = make_world_image_pairs(tmp_path / "pairs.pt", EMBEDDED_DIR / "Wan2.1_VAE.pth", 3, seed=5)
    data = LatentDataset.from_file(path, 0, "image_latents")
    assert data.latents.shape == (3, 1, 16, 12, 16)
    vae = WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth")
    prompt, scene_seed = dataset_item(2, 5)
    assert data.prompts[2] == prompt
    pixels = torch.from_numpy(world_video(prompt, scene_seed, num_frames=1)[0])[None]  # [1, 3, 1, 96, 128]
    torch.testing.assert_close(data.latents[2:3], vae.encode(pixels), rtol=1e-5, atol=1e-5)


def i2v_trainer(tmp_path, *overrides):
    from test_training import BASE, tiny_models
    from training import distributed as fsdp
    from training.checks import check_config, load_train_config
    from training.data import LatentDataset
    from training.text import HashTextEncoder
    from training.trainer import Trainer

    cfg, sets_sid_alpha = load_train_config("configs/self_forcing_dmd.yaml", BASE + [
        "image_or_video_shape=[1,7,16,4,6]", "num_training_frames=7", "independent_first_frame=true", "i2v=true",
        *overrides])
    plan = check_config(cfg, 1, sets_sid_alpha=sets_sid_alpha)
    models = tiny_models(plan.trainer)
    models.generator.independent_first_frame = True
    images = torch.randn(4, 1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    data = LatentDataset(["a red square", "a blue circle", "a green square", "a red circle"], images,
                         "image_latents", seed=7)
    return Trainer(cfg, models, HashTextEncoder(16, 32), tmp_path, d=fsdp.setup("cpu"), plan=plan, data=data,
                   progress=False, log=lambda *a: None)


def test_dmd_step_from_text_image_pairs(tmp_path):
    tr = i2v_trainer(tmp_path, "dfake_gen_update_ratio=1")
    calls = []
    probe = Probe(CallFilter(layers={0}, kinds={"self"}), fn=lambda call, *rest: calls.append(call))
    seen = []
    original = tr.rollout

    def rollout(*args, **kw):
        x, exits = original(*args, **kw)
        seen.append((x.detach().clone(), kw["images"]))
        return x, exits

    tr.rollout = rollout
    before = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    with attach(tr.generator, probe):
        logs = tr.iteration()
    assert np.isfinite(logs["generator_loss"]) and logs["generator_grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in tr.generator.state_dict().items())
    assert len(seen) == 2  # the generator's and the critic's rollouts
    for x, images in seen:
        assert images.shape == (1, 1, 16, 4, 6) and torch.equal(x[:, :1], images)  # frame 0 is the pair's image
    assert any(torch.equal(seen[0][1][0], item) for item in tr.data.latents)  # an item of the pair set
    chunk0 = [c for c in calls if c.labels.chunk == 0]
    assert chunk0 and {(c.labels.phase, c.labels.timestep, c.query_frames) for c in chunk0} == {("context", 0.0, (0,))}


def test_i2v_config_errors():
    from test_training import BASE
    from training.checks import check_config, load_train_config
    from training.errors import TrainingError

    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", BASE + ["i2v=true"])
    with pytest.raises(TrainingError, match="independent_first_frame: true"):
        check_config(cfg, 1)
    cfg, _ = load_train_config("configs/world_i2v_dmd.yaml")
    plan = check_config(cfg, 1)
    assert cfg.i2v and plan.shape == (7, 16, 12, 16)

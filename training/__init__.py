"""Training Self-Forcing models the way the released ones were trained, with attention probes on the way.

    trainer.py      the loop: score distillation (DMD / SiD, generator : critic = 1 : dfake_gen_update_ratio),
                    ODE regression, diffusion; checkpoints in the researchers' format; resume; build from config
    rollout.py      the training rollout (gradient only through the exit step) and ODE-pair generation
    losses.py       DMD, critic flow loss, SiD, ODE regression, diffusion; the score-timestep sampling
    distributed.py  torchrun / one-process gloo, FSDP2 sharding with bf16 mixed precision, state dicts
    ema.py, rng.py  the generator EMA; counter-based randomness (resume- and rank-invariant)
    data.py         prompt files, latent datasets (ODE pairs), a synthetic data set for teachers
    text.py         prompt embeddings (cached), a seeded stand-in encoder
    probes.py       attention probes every N steps into a store along `train_step`
    study.py        attention across training, from a probe store
    logger.py       losses.csv (+ TensorBoard, wandb)
    commands.py     `workbench train`
    world_data.py   `data_path: world`: latents of the miniature world's videos (models/world.py), cached
    world_vae.py    the embedded zoo's VAE, trained on the miniature world (Wan2.1's layout)
    zoo.py          the embedded zoo: every configs/zoo_*.yaml in order, under a time budget, shipped as data/embedded
"""

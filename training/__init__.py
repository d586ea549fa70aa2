"""Training Self-Forcing models the way the released ones were trained, with attention probes on the way.

    config.py       the training YAML's schema (the researchers' keys and defaults), merged onto
                    configs/default_config.yaml
    checks.py       loading a config and every check before any work (-> Plan)
    build.py        models, data, probes and the Trainer from a checked config
    trainer.py      the loop: iterations, EMA, logs, probes (Trainer)
    steps.py        one step: score distillation (DMD / SiD, generator : critic = 1 : dfake_gen_update_ratio),
                    ODE regression, diffusion; draws, micro-batch losses, the optimiser update
    checkpoints.py  checkpoints in the researchers' format; resume
    ode_pairs.py    `--make-ode-pairs`: the teacher's ODE trajectories
    gan.py          `trainer: gan`: the discriminator's branch, the GAN losses (GanTrainer)
    i2v.py          text-image pairs (image-to-video) and text-video latents (GAN) from the miniature world
    rollout.py      the training rollout (gradient only through the exit step) and ODE-pair generation
    losses.py       DMD, critic flow loss, SiD, ODE regression, diffusion; the score-timestep sampling
    distributed.py  torchrun / one-process gloo, FSDP2 sharding with bf16 mixed precision, state dicts
    ema.py, rng.py  the generator EMA; counter-based randomness (resume- and rank-invariant)
    data.py         prompt files, latent datasets (ODE pairs), a synthetic data set for teachers
    text.py         prompt embeddings (cached), a seeded stand-in encoder
    probes.py       attention probes every N steps into a store along `train_step`
    logger.py       losses.csv (+ TensorBoard, wandb)
    commands.py     `workbench train`
    errors.py       TrainingError: a bad config or request, one clear line before any work
    world_data.py   `data_path: world`: latents of the miniature world's videos (models/world.py), cached
    world_vae.py    the embedded zoo's VAE, trained on the miniature world (Wan2.1's layout)
    world_vae_model.py  that VAE's model pieces (toy widths of Wan2.1's VAE, its start, its state dict)
    word_check.py   does each prompt word steer a model (flow-matching error with one word swapped)
    zoo.py          the embedded zoo: every configs/zoo_*.yaml in order, under a time budget, shipped as data/embedded
    zoo_check.py    the zoo's quick check: each model samples the prompt grid, a pixel tracker reads it back
    zoo_ship.py     the zoo's outputs: the data/embedded folder, its ZOO.md, the tar parts of a run
    study.py        an old path of studies/training.py, kept for user scripts
"""

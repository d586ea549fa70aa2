"""The CLI's commands, one module each (`register(subparsers)` + `run(args)`), and the arguments they share."""


def add_model_arguments(group) -> None:
    """Which weights to run and where: the options `extract` and `generate` share (an argparse parser or group)."""
    group.add_argument("--wan-dir", metavar="DIR", help="the official Wan2.1 folder (default: the embedded default)")
    group.add_argument("--checkpoint", metavar="FILE",
                       help="a Self-Forcing .pt (generator / generator_ema) on top of the Wan folder's config")
    group.add_argument("--use-ema", action="store_true", help="load generator_ema instead of generator")
    group.add_argument("--trust-pickle", action="store_true", help="allow a checkpoint that needs full unpickling")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    group.add_argument("--dtype", default=None,
                       help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")

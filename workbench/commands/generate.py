"""`workbench generate` (wired below)."""


def register(subparsers) -> None:
    pass

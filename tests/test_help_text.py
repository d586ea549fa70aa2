"""Every command's --help fits the terminal it is printed in (workbench/help_text.py): prose re-filled, examples
broken into shell continuations that are still the same commands, tables wrapped under their columns, and nothing
lost on the way."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import cli
from workbench import help_text as h

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (50, 60, 80, 100, 140)


def _texts():
    parser = cli.build_parser()
    parsers = [("workbench", parser)] + list(parser._subparsers._group_actions[0].choices.items())
    return [(name, text) for name, sub in parsers for text in (sub.description, sub.epilog) if text]


def _words(text: str) -> list[str]:
    """The words of a text, without the marks fitting adds or moves (continuation backslashes, comment marks)."""
    return [w for w in text.split() if w not in ("\\", "#")]


def _commands(lines: list[str]) -> list[list[str]]:
    """The example commands in `lines`: each joined from its backslash-continued lines, its comment left off
    (not the rows of a table of commands and what they do)."""
    commands, current = [], None
    for line in lines:
        words = line.split()
        if current is None and (not words or words[0] not in h._COMMANDS or not line[:1].isspace()
                                or h._kind(line) == "columns"):
            continue
        current = (current or []) + [w for w in words if w != "\\"]
        if not line.rstrip().endswith("\\"):
            cut = next((i for i, w in enumerate(current) if w.startswith("#")), len(current))
            commands.append(current[:cut])
            current = None
    return commands


@pytest.mark.parametrize("width", WIDTHS)
def test_every_description_and_epilog_fits_and_keeps_its_words_and_commands(width):
    for name, text in _texts():
        out = h.fit(text, width)
        too_wide = [line for line in out if len(line) > width and not h._CODE.search(line)
                    and len(h._words(line.replace(" \\", "").strip())) > 1]  # (a word, quoted or not, stays whole)
        assert not too_wide, (name, width, too_wide)
        assert sorted(_words("\n".join(out))) == sorted(_words(text)), (name, width)
        commands = iter(_commands(out))  # (a table's row may become a command on a line of its own)
        assert all(command in commands for command in _commands(text.splitlines())), (name, width)


def test_a_wide_terminal_shows_the_indented_lines_as_written():
    for name, text in _texts():
        indented = [line.rstrip() for line in text.splitlines() if line[:1].isspace()]
        out = h.fit(text, 1000)
        assert [line for line in out if line[:1].isspace()] == indented, name
        assert all(len(line) <= h.PROSE_WIDTH for line in out if line[:1].strip()), name


def test_the_rules_on_small_texts():
    text = ("first paragraph that is rather long and goes on for a while here.\nShort end.\nnext paragraph "
            "starts here without a blank line\n\n"
            "  workbench extract --layer 3 --prompt \"a red kite\" --out runs/x.zarr             # a comment\n"
            "  a.b = torch.load(\"x\", weights_only=True)\n"
            "  --ablate L:H     replace heads' self-attention output: zero (default), mean, resample\n"
            "                   (from --resample-prompt's rollout)\n")
    out = h.fit(text, 40)
    assert out[:3] == ["first paragraph that is rather long and", "goes on for a while here. Short end.",
                       "next paragraph starts here without a"]  # (a short line ending a sentence ends a paragraph)
    i = out.index("  # a comment")  # the comment above its command, broken before options, quotes kept whole
    assert out[i + 1:i + 4] == ["  workbench extract --layer 3 \\", "      --prompt \"a red kite\" \\",
                                "      --out runs/x.zarr"]
    assert "  a.b = torch.load(\"x\", weights_only=True)" in out  # Python as written
    assert out[-5:] == ["  --ablate L:H", "      replace heads' self-attention",  # (too narrow beside it)
                        "      output: zero (default), mean,", "      resample (from --resample-prompt's",
                        "      rollout)"]
    assert h.fit(text, 48)[-4:] == ["  --ablate L:H     replace heads' self-attention",  # its continuation joined
                                    "                   output: zero (default), mean,",
                                    "                   resample (from", "                   --resample-prompt's rollout)"]


def test_the_cli_and_the_drivers_use_the_formatter():
    env = {**os.environ, "COLUMNS": "60"}
    runs = [["workbench.cli"] + ([command] if command else []) for command in ("", "extract", "intervene", "train")]
    for command in runs + [["training.zoo"], ["training.world_vae"], ["training.i2v"]]:  # (and the drivers' own)
        args = [sys.executable, "-m"] + command + ["--help"]
        out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        epilog = out[out.index("examples:"):] if "examples:" in out else out.split("\n\n", 1)[1]
        wide = [line for line in epilog.splitlines() if len(line) > 60 and not h._CODE.search(line)
                and not re.match(r"^\s+--?\w", line) and len(h._words(line.replace(" \\", "").strip())) > 1]
        assert not wide, (command, wide)

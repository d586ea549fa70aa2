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


def test_a_wide_terminal_shows_the_texts_as_written():
    for name, text in _texts():
        assert h.fit(text, 1000) == [line.rstrip() for line in text.splitlines()], name


def test_a_comment_stays_with_its_line():
    """A comment moved off its line goes right below it (its command's last line, its YAML item), never to the
    next example (it went above, so that an output path written as `# -> FILE` read as the line above's)."""
    for name, text in _texts():
        for width in WIDTHS:
            out = h.fit(text, width)
            for line in text.splitlines():
                match = h._TWO_COLUMNS.match(line)
                if not match or not match.group(4).startswith("#") or match.group(2).startswith("#"):
                    continue
                said, last = match.group(4).lstrip("#").split(), h._words(match.group(2))[-1]

                def starts(o):  # the output line where this comment starts (its first words, at least 3 of them)
                    got = o.split("#", 1)[1].split() if "#" in o else []
                    return len(got) >= min(3, len(said)) and said[:len(got)] == got

                k = next(k for k, o in enumerate(out) if starts(o))
                before = h._words(out[k].split("#", 1)[0])
                assert (before or h._words(out[k - 1]))[-1] == last, (name, width, line, out[k - 1:k + 1])


def test_the_rules_on_small_texts():
    import yaml

    text = ("first paragraph that is rather long and goes on for a while here.\nShort end.\nnext paragraph "
            "starts here without a blank line\n- an item at the margin that goes on and on and on\n  and its second "
            "line\n\n"
            "  workbench extract --layer 3 --prompt \"a red kite\" --out runs/x.zarr             # a comment\n"
            "  a.b = torch.load(\"x\", weights_only=True)\n"
            "  --ablate L:H     replace heads' self-attention output: zero (default), mean, resample\n"
            "                   (from --resample-prompt's rollout)\n"
            "  spec:\n    - kind: ablate\n      prompt: \"a very long prompt that will need to be wrapped somewhere\"\n"
            "  workbench generate --prompt don't --out runs/somewhere/long/path --seed 0-3\n"
            "\tworkbench info --preset wan2.1-t2v-1.3b --frames 21\n")
    out = h.fit(text, 40)
    assert out[:6] == ["first paragraph that is rather long and", "goes on for a while here. Short end.",
                       "next paragraph starts here without a", "blank line",  # (a short line ending a sentence ends
                       "- an item at the margin that goes on and", "  on and on and its second line"]  # a paragraph)
    i = out.index("  workbench extract --layer 3 \\")  # broken before options, quotes kept whole, the comment below
    assert out[i:i + 4] == ["  workbench extract --layer 3 \\", "      --prompt \"a red kite\" \\",
                            "      --out runs/x.zarr", "          # a comment"]
    assert out[i + 4] == "  a.b = torch.load(\"x\", weights_only=True)"  # Python as written
    assert out[i + 5:i + 10] == ["  --ablate L:H", "      replace heads' self-attention",  # (too narrow beside it)
                                 "      output: zero (default), mean,", "      resample (from --resample-prompt's",
                                 "      rollout)"]
    spec = out[i + 10:i + 15]  # block YAML: each key its own line, a long value continued further in
    assert spec[:3] == ["  spec:", "    - kind: ablate", "      prompt: \"a very long prompt that"]
    assert yaml.safe_load("\n".join(spec)) == yaml.safe_load("  spec:\n    - kind: ablate\n      prompt: \"a very "
                                                             "long prompt that will need to be wrapped somewhere\"")
    assert out[i + 15:] == ["  workbench generate \\", "      --prompt don't \\",  # (an apostrophe: no words lost)
                            "      --out runs/somewhere/long/path \\", "      --seed 0-3",
                            "        workbench info \\", "            --preset wan2.1-t2v-1.3b \\",  # (a tab: 8)
                            "            --frames 21"]
    wider = h.fit(text, 48)
    j = wider.index("  --ablate L:H     replace heads' self-attention")
    assert wider[j:j + 4] == ["  --ablate L:H     replace heads' self-attention",  # its continuation
                              "                   output: zero (default), mean,",  # joined
                              "                   resample (from", "                   --resample-prompt's rollout)"]
    assert h.fit(text, 200) == [line.rstrip() for line in text.expandtabs(8).splitlines()]  # all fits: as written


def test_group_titles_fit(monkeypatch):
    import argparse

    parser = argparse.ArgumentParser(prog="x", formatter_class=h.HelpFormatter)
    group = parser.add_argument_group("the prompt x seed grid (default: every colour x shape x direction, seeds 0-2)")
    group.add_argument("--seeds")
    monkeypatch.setenv("COLUMNS", "40")  # (restored after the test, set or not before it)
    out = parser.format_help()
    assert "the prompt x seed grid (default:\nevery colour x shape x direction,\nseeds 0-2):" in out
    assert max(map(len, out.splitlines())) <= 40


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

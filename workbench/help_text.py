"""The formatter every `workbench` command's --help goes through: descriptions and epilogs fit the terminal.

The commands' descriptions and epilogs are plain text written for a wide terminal. A piece of it whose every line
fits the terminal is shown as written; one with a line too wide is fitted:
- prose at the margin (a paragraph; an item starting with "- ") is re-filled, at most `PROSE_WIDTH` columns wide;
  a paragraph ends at a blank line, before an indented line or an item, or after a line that ends a sentence well
  short of the text's longest line;
- a command (a line starting with `workbench`, `torchrun`, `python` or `python3`, continued over lines ending in a
  backslash) is broken before its `--` options (outside quotes) into lines ending in a backslash, so that it stays
  copyable: its words are never broken or lost;
- a line of two columns (two or more spaces after the first; lines starting under the second continue it) has its
  second column wrapped under itself where at least `MIN_COLUMN` columns are left there (a comment in at most two
  lines), else on lines of its own: a comment below its command or item, 4 columns further in (so it still reads
  as that line's), a table's description below its first column;
- a line of Python (a call, an index or an assignment in it) stays as written;
- other indented lines (YAML keys and list items, asides in brackets) are wrapped at their indent, continuation
  lines 3 further in (a flow-style YAML item, `- {...}`, takes its continuation lines along while a bracket is
  open); indented prose over several lines of one indent is re-filled as one paragraph.
So every word of the text is kept, in its order but for comments moved below their lines, and every command joined
from its lines is the command written. Argument-group titles are wrapped too. Tabs count as 8 columns.

workbench/cli.py sets this formatter on the top-level parser and on every subcommand's parser; the training
drivers (training/zoo.py, world_vae.py, i2v.py) on theirs.
"""

from __future__ import annotations

import argparse
import re
import textwrap

PROSE_WIDTH = 110  # prose is filled to at most this many columns, however wide the terminal
MIN_COLUMN = 24  # a second column narrower than this goes on lines of its own

_TWO_COLUMNS = re.compile(r"^(\s+)(\S.*?\S)(\s{2,})(\S.*)$")  # indent, first column, gap, second column
_SENTENCE_END = (".", ":", ")")
_COMMANDS = {"workbench", "torchrun", "python", "python3"}  # example lines that are commands
_CODE = re.compile(r"\w[(\[]|\s=\s")  # an indented line of Python (a call, an index, an assignment): as written
_LISTS = ("- ", "{", "[", "(")  # indented lines that start an item of their own (YAML, lists, asides)
_YAML_KEY = re.compile(r"^\s*[\w.-]+:(\s|$)")  # an indented `key: value` line of YAML


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, with descriptions, epilogs and group titles fitted to the terminal (module docstring)."""

    def _fill_text(self, text, width, indent):
        return "\n".join((indent + line).rstrip() for line in fit(text or "", width - len(indent)))

    def start_section(self, heading):
        room = max(self._width - self._current_indent - 1, MIN_COLUMN)
        super().start_section(heading and "\n".join(textwrap.wrap(heading, room, break_on_hyphens=False)))


def apply(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Set `HelpFormatter` on `parser` and on every subcommand parser under it; returns `parser`."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply(sub)
    return parser


def fit(text: str, width: int) -> list[str]:
    """The lines of `text` fitted to `width` columns (the module docstring)."""
    out: list[str] = []
    for kind, lines in _pieces(text):
        if all(len(line) <= width for line in lines):
            out.extend(lines)
        elif kind in ("paragraph", "item"):
            words = " ".join(line.strip() for line in lines)
            out.extend(_wrap(words, min(width, PROSE_WIDTH), "", "  " if kind == "item" else ""))
        else:
            out.extend(_fit_indented(kind, lines, width))
    return out


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _kind(line: str) -> str:
    """What an indented line starts: "command", "columns", "comment", "list", "code" or "prose"."""
    first, match = line.split()[0], _TWO_COLUMNS.match(line)
    if first in _COMMANDS and not (match and not match.group(4).startswith("#")):
        return "command"  # (a command with a description beside it is a table's row)
    if match:
        return "columns"
    if first.startswith("#"):
        return "comment"
    if line.lstrip().startswith(_LISTS) or _YAML_KEY.match(line):
        return "list"
    return "code" if _CODE.search(line) else "prose"


def _pieces(text: str) -> list[tuple[str, list[str]]]:
    """`text` cut into (kind, lines): "paragraph"s and "item"s at the margin, "blank" lines and indented pieces,
    each with the lines that continue it (the module docstring)."""
    lines = [line.rstrip() for line in text.expandtabs(8).splitlines()]
    longest = max((len(line) for line in lines if line[:1].strip()), default=0)
    pieces: list[tuple[str, list[str]]] = []
    piece = None  # the piece the next line may continue
    for line in lines:
        if not line.strip():
            pieces.append(("blank", [""]))
            piece = None
        elif not line[0].isspace():
            if piece is None or piece[0] not in ("paragraph", "item") or line.startswith("- "):
                piece = ("item" if line.startswith("- ") else "paragraph", [])
                pieces.append(piece)
            piece[1].append(line)
            if line.endswith(_SENTENCE_END) and len(line) < longest - 20:
                piece = None
        elif piece is not None and _continues(piece, line):
            piece[1].append(line)
        else:
            piece = (_kind(line), [line])
            pieces.append(piece)
    return pieces


def _continues(piece: tuple[str, list[str]], line: str) -> bool:
    """Whether an indented `line` continues `piece` (the module docstring)."""
    kind, lines = piece
    if kind == "item":  # (an item at the margin, continued 2 in)
        return _indent(line) == "  " and _kind(line) == "prose"
    if kind in ("paragraph", "code", "comment"):
        return False
    if lines[-1].endswith("\\"):
        return True
    if _kind(line) == "comment":  # a comment continued under the comment of the line above
        return _comment_column(lines[-1]) == len(_indent(line))
    if kind == "columns":  # (a line under the second column, or at least 4 columns right of the first)
        return len(_indent(line)) >= len(_indent(lines[0])) + 4 and _kind(line) in ("prose", "list", "code")
    if kind == "prose":
        return _indent(line) == _indent(lines[0]) and _kind(line) == "prose"
    if kind == "list":  # a flow-style item while a bracket is open (its last line may end in a comment)
        text = " ".join(lines)
        return (len(_indent(line)) > len(_indent(lines[0])) and _kind(line) in ("prose", "list", "columns")
                and sum(text.count(o) - text.count(c) for o, c in ("{}", "[]")) > 0)
    return False


def _comment_column(line: str) -> int | None:
    """Where the comment of an indented line (two spaces and `#` after something else) starts, if it has one."""
    match = _TWO_COLUMNS.match(line)
    return len(line) - len(match.group(4)) if match and match.group(4).startswith("#") else None


def _join(lines: list[str]) -> str:
    """A piece's lines as one line: continuation backslashes and the `#` of continued comments dropped."""
    out = lines[0].rstrip().removesuffix("\\").rstrip()
    for line in lines[1:]:
        text = line.strip().removesuffix("\\").strip()
        out += " " + (text.lstrip("#").strip() if text.startswith("#") and "#" in out else text)
    return out


def _wrap(text: str, width: int, indent: str = "", later: str | None = None) -> list[str]:
    return textwrap.wrap(text, max(width, len(indent) + MIN_COLUMN), initial_indent=indent,
                         subsequent_indent=indent if later is None else later, break_long_words=False,
                         break_on_hyphens=False)


def _fit_indented(kind: str, lines: list[str], width: int) -> list[str]:
    """An indented piece with a line wider than `width`, fitted (the module docstring)."""
    indent = _indent(lines[0])
    if kind == "code":
        return lines
    if kind == "comment":  # a comment of its own: wrapped, further left if need be
        indent = " " * max(2, min(len(indent), width - 40))
        return _wrap(" ".join(line.strip().lstrip("#").strip() for line in lines), width, indent + "# ")
    if kind == "prose":
        return _wrap(" ".join(line.strip() for line in lines), width, indent)
    line = _join(lines)
    if kind in ("command", "list"):  # (with any comment after its last line)
        words = _words(line)
        at = next((i for i, word in enumerate(words) if word.startswith("#")), None)
        if at is None:
            return _break_command(line, width) if kind == "command" else _wrap(line.strip(), width, indent,
                                                                             indent + "   ")
        line = indent + " ".join(words[:at]) + "  " + " ".join(words[at:])
    return _fit_columns(*_TWO_COLUMNS.match(line).groups(), width)


def _fit_columns(indent: str, first: str, gap: str, second: str, width: int) -> list[str]:
    """A line of two columns wider than `width`, fitted (the module docstring)."""
    command = first.split()[0] in _COMMANDS
    comment = second.startswith("#")
    if comment and len(indent) + len(first) + 2 + len(second) <= width:  # fits with a narrower gap
        return [indent + first + "  " + second]
    words = " ".join(second.lstrip("#").split()) if comment else second
    column = len(indent) + len(first) + len(gap)
    room = width - column - (2 if comment else 0)
    beside = textwrap.wrap(words, room, break_long_words=False, break_on_hyphens=False) if room >= MIN_COLUMN else []
    if beside and (len(beside) <= 2 or not comment) and max(map(len, beside)) <= room:
        beside = ["# " + piece for piece in beside] if comment else beside
        return [indent + first + gap + beside[0]] + [" " * column + piece for piece in beside[1:]]
    head = _break_command(indent + first, width) if command else _wrap(first, width, indent, indent + "   ")
    under = indent + " " * (8 if len(head) > 1 else 4)  # (further in than a command's continuation lines)
    return head + _wrap(words, width, under + ("# " if comment else ""))


def _words(line: str) -> list[str]:
    """The words of a shell command line, quoted strings kept whole with their quotes (a comment's words plain; a
    quote left open is an apostrophe: the words after it plain)."""
    words, quote, start, opened = [], None, 0, 0
    for i, char in enumerate(line + " "):
        if char == "#" and quote is None and i == start:  # a comment: its apostrophes are no quotes
            return words + line[i:].split()
        if char in "'\"" and quote in (None, char):
            quote, opened = (None, opened) if quote else (char, len(words))
        elif char.isspace() and quote is None:
            if i > start:
                words.append(line[start:i])
            start = i + 1
    if quote is not None:  # (never closed)
        return words[:opened] + line[start:].split()
    return words


def _break_command(line: str, width: int) -> list[str]:
    """A shell command wider than `width` broken into lines ending in ` \\`, the later ones indented 4 more: before
    its `--` options (an option with its values kept together where they fit a line), else between its words;
    never inside quotes."""
    indent, words = _indent(line), _words(line)
    if not words or words[0] not in _COMMANDS:
        return [line]
    parts: list[list[str]] = []  # an option and its values, or the words before the first option
    for word in words:
        if word.startswith("--") or not parts:
            parts.append([word])
        else:
            parts[-1].append(word)
    out, current = [], ""
    room = width - len(indent) - 4 - 2  # a continuation line: the extra indent and the trailing " \"
    for part in parts:
        pieces = [" ".join(part)]
        if len(pieces[0]) > room and len(part) > 1:  # (an option too wide for a line: its values apart)
            pieces = [" ".join(part[:2])] + part[2:] if len(" ".join(part[:2])) <= room else part
        for piece in pieces:
            if current and len(current) + 1 + len(piece) > room:
                out.append(current)
                current = piece
            else:
                current = f"{current} {piece}" if current else piece
    out.append(current)
    return [(indent if i == 0 else indent + "    ") + text + (" \\" if i < len(out) - 1 else "")
            for i, text in enumerate(out)]

"""Progress bars for long work: tqdm's (`tqdm.auto`), drawn as usual on a terminal and in Jupyter; when stderr goes
to a file (a batch job's log, `2> run.log`), redrawn at most every LOG_INTERVAL seconds, so that an hour's run
writes a hundred or so short updates there, not megabytes of redraws. `--no-progress` (disable=True) still hides
them. Every command's bars come from `progress_bar`.

Also here: `printable`, which writes a text's control characters as escapes, for the lines that print text a
shared store or a spec file gave (intervene's table of entry labels, evaluate's command line): such text can hold
a terminal's escape sequences; `fit`, which pads or cuts a text to a number of terminal columns (a CJK
character takes two), for the columns of those tables; and `shell_word`, a path as a command line to copy takes
it."""

from __future__ import annotations

import sys

LOG_INTERVAL = 30.0  # seconds between redraws when nobody watches a terminal


def printable(text) -> str:
    """`text` (made a str) with each control character (Unicode's Cc and Cf: ESC, BEL, newlines, a right-to-left
    override, ...) written as its Python escape (`\\x1b`, `\\n`): shown, never obeyed (an escape sequence can clear a
    screen or retitle it). Every other character, wide spaces included, stays as it is."""
    import unicodedata

    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf") else c for c in str(text))


def shell_word(path) -> str:
    """`path` as one word of a command to copy and run: quoted where a shell would split or expand it, and `./` in
    front of a relative name that starts with `-` (`workbench report -x.zarr` read it as an option)."""
    import shlex

    text = str(path)
    return shlex.quote("./" + text if text.startswith("-") else text)


def columns(text: str) -> int:
    """How many terminal columns `text` takes: two for each wide (East Asian W/F) character, none for a combining
    mark, one for the rest."""
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def fit(text: str, width: int) -> str:
    """`text` cut to at most `width` terminal columns (a wide character that would cross the edge left out) and
    padded with spaces to exactly `width`: `f"{label:<{n}}"` counts characters, so a CJK label pushed its row's
    numbers out of their columns."""
    out, used = [], 0
    for c in text:
        w = columns(c)
        if used + w > width:
            break
        out.append(c)
        used += w
    return "".join(out) + " " * (width - used)


def progress_bar(*args, **kw):
    """tqdm.auto.tqdm(*args, **kw), redrawn every LOG_INTERVAL seconds at most when stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not interactive():
        kw.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(*args, **kw)


def interactive(stream=None) -> bool:
    """Whether a person watches the bars: stderr is a terminal, or this is a Jupyter kernel (tqdm's widget)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # (a closed or replaced stream)
        pass
    return "ipykernel" in sys.modules

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

import functools
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
    """tqdm.auto.tqdm(*args, **kw); when stderr is not a terminal (a batch job's log), a line at most every
    LOG_INTERVAL seconds: each drawing its own line of ASCII (a bar redrawn with a carriage return made one line of
    megabytes, a message printed meanwhile was glued to its end), and a new postfix (a loss, a video's name) waits
    for the next drawing (it forced one each step)."""
    from tqdm.auto import tqdm

    if interactive():
        return tqdm(*args, **kw)
    kw.setdefault("mininterval", LOG_INTERVAL)
    kw.setdefault("maxinterval", LOG_INTERVAL)  # (tqdm's monitor thread redrew a bar every 10 s, its default)
    kw.setdefault("ascii", True)
    kw["file"] = _Lines(kw.get("file") or sys.stderr)
    return _log_bar_class(tqdm)(*args, **kw)


class _Lines:
    """A stream for a bar drawn into a log: each drawing (tqdm's carriage return and the bar) written as a line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


@functools.cache  # (one class, made on the first bar)
def _log_bar_class(tqdm):
    class LogBar(tqdm):
        """A bar whose postfix waits for the next drawing."""

        def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
            super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

        def set_postfix_str(self, s="", refresh=False):
            super().set_postfix_str(s, refresh=refresh)

    return LogBar


def interactive(stream=None) -> bool:
    """Whether a person watches the bars: stderr is a terminal, or this is a Jupyter kernel (tqdm's widget)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # (a closed or replaced stream)
        pass
    return "ipykernel" in sys.modules

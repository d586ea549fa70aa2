"""Paths and terminals as shared clusters have them: `~` in an option, names zarr or the disk cannot take, a store
found above the working directory, prompts from a pipe, an ASCII-only stdout, a reader that closes the pipe."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from models.video import read_prompts
from studies import synthetic
from workbench.cli import main
from workbench.progress import shell_word

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`workbench ARGS` in a fresh process (its stdout and stderr as text, escapes kept)."""
    environ = {**os.environ, **env}  # (tests/conftest.py put this tree on PYTHONPATH)
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, encoding="utf-8", errors="backslashreplace", timeout=300)


def test_a_leading_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """bash leaves `--out=~/x` as it is: the store's lock went to ./~/, xarray's write to the real home, and the run
    failed after its work. A leading ~ in a path option is the home folder, as a shell would have made it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    synthetic.write_store(home / "s.zarr", "causal", layers=(0,), num_heads=2)
    assert main(["report", "~/s.zarr", "--out=~/r.html"]) == 0
    assert (home / "r.html").is_file() and not (tmp_path / "~").exists()
    (home / "afile").write_text("x")
    assert main(["extract", "--layer", "0", "--out=~/afile"]) == 2  # (refused before any work, under its real name)
    assert f"--out {str(home / 'afile')!r} is a file, not a store" in capsys.readouterr().err
    assert not (tmp_path / "~").exists() and not (home / ".afile.lock").exists()
    assert main(["evaluate", "--model=x=~/missing.pt,ema", "--out", str(tmp_path / "e")]) == 2  # (a SOURCE after =)
    assert f"{str(home / 'missing.pt')!r} is no model name" in capsys.readouterr().err


@pytest.mark.parametrize("name, words", [("a::b.zarr", "holds '::', which zarr reads as a chain of URLs"),
                                         ("c" * 215 + ".zarr", "its name is 220 bytes, at most 217 here"),
                                         ("日本" * 36 + ".zarr", "its name is 221 bytes, at most 217 here")])
def test_a_store_name_no_writer_could_finish_is_refused_first(name, words, tmp_path, capsys):
    """zarr took `::` for a chain of URLs, and a name the disk allows failed with the hidden files beside it (38
    bytes longer): both after the whole rollout, leaving a lock file. Now refused before anything is made."""
    assert main(["extract", "--layer", "0", "--out", str(tmp_path / name), "--no-progress"]) == 2
    assert words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    if "::" in name:  # (behind a symlink too: the writer writes beside the real folder)
        (tmp_path / "real::dir").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real::dir")
        assert main(["extract", "--layer", "0", "--out", str(tmp_path / "link" / "x.zarr"), "--no-progress"]) == 2
        assert "(its real path " in capsys.readouterr().err and list((tmp_path / "real::dir").iterdir()) == []


def test_a_report_goes_beside_the_store_it_opened(tmp_path, monkeypatch, capsys):
    """`report s.zarr` in a folder below the store's opens the store above (studies.find_store), and wrote its page
    into the working directory, where the docs say it goes beside the store."""
    synthetic.write_store(tmp_path / "s.zarr", "causal", layers=(0,), num_heads=2)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["report", "s.zarr"]) == 0
    assert (tmp_path / "s.html").is_file() and not (tmp_path / "sub" / "s.html").exists()
    capsys.readouterr()  # export-legacy finds it too (it said 'no store' and to make one there)
    assert main(["export-legacy", "s.zarr", "--out", "legacy"]) == 0
    assert f"opened {tmp_path / 's.zarr'}" in capsys.readouterr().out and any((tmp_path / "sub" / "legacy").iterdir())


def test_prompts_from_standard_input_and_a_pipe(tmp_path, monkeypatch):
    """`--prompts -` and `--prompts <(grep circle prompts.txt)` were 'prompt file not found' (a pipe is no regular
    file)."""
    import io

    text = "\ufeffa blue circle moving up\n\nun café\n"  # (a byte order mark, a blank line, a letter beyond ASCII)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    with pytest.warns(UserWarning, match="blank line 2 skipped"):
        assert read_prompts("-") == ["a blue circle moving up", "un café"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a red square moving left\n"))
    writer.start()
    assert read_prompts(fifo) == ["a red square moving left"]
    writer.join()


def test_shell_words_are_taken_back_as_written():
    assert shell_word("-x.zarr") == "./-x.zarr" and shell_word("/runs/-x.zarr") == "/runs/-x.zarr"
    assert shell_word("runs/a b.zarr") == "'runs/a b.zarr'" and shell_word("runs/s.zarr") == "runs/s.zarr"


def test_an_ascii_terminal_and_a_closed_pipe_end_cleanly(tmp_path):
    """With PYTHONIOENCODING=ascii a finished run's 'wrote café.html' was a traceback and exit status 1; a reader
    that closes the pipe (`workbench info | head -1`) made 'error: Broken pipe' and status 1. Now the letter is an
    escape, and a closed pipe is quiet with a shell's status for it (141)."""
    synthetic.write_store(tmp_path / "café.zarr", "causal", layers=(0,), num_heads=2)
    done = cli("report", "café.zarr", cwd=tmp_path, PYTHONIOENCODING="ascii")
    assert done.returncode == 0 and "wrote caf\\xe9.html" in done.stdout, done.stderr
    environ = dict(os.environ)
    environ.pop("PYTHONUNBUFFERED", None)  # (buffered, as a pipe's stdout is: its lines are written at the end)
    for command in (["info"], ["report", "café.zarr"]):
        run = subprocess.Popen([sys.executable, "-m", "workbench.cli", *command], cwd=tmp_path, env=environ,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        run.stdout.close()  # (before the process has printed anything: its output meets a closed pipe)
        assert run.wait(timeout=300) == 141 and run.stderr.read() == b"", command

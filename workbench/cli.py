"""The `workbench` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module with a `register(subparsers)` function that adds an argparse
parser and sets `func` to the function that runs it. The modules are imported plainly here; they import
nothing heavy at the top (torch, xarray and plotly are imported inside the commands), so `workbench --help`
is quick. `workbench report` / `compare` live with the studies (studies/commands.py) and `workbench train`
with the training code (training/commands.py): the CLI is the one place that joins the three.
"""

from __future__ import annotations

import argparse
import errno
import sys

from studies import commands as study_commands
from training import commands as training_commands
from workbench import help_text
from workbench.commands import evaluate, export_legacy, extract, generate, info, intervene, view
from workbench.errors import Terminated

# subcommand modules, in the order `workbench --help` lists them
COMMANDS = (info, generate, extract, evaluate, intervene, export_legacy, view, study_commands, training_commands)
COMMAND_MODULES = [module.__name__ for module in COMMANDS]

DESCRIPTION = """\
Self-Forcing attention workbench: see how autoregressive video diffusion models attend across frames.

  workbench info                      what model would run, its size and token geometry
  workbench generate --prompt "..."   latents (and videos) from the embedded default or a Wan folder
  workbench extract --layer 3         frame-by-frame attention of layer 3 into a zarr store
  workbench evaluate                  score models on the miniature world (adherence, trajectory, drift)
  workbench intervene --ablate 3:0    ablate heads, knock out frames, change cache policies: effects on the video
  workbench report STORE              an HTML report of a store (attention or effects)
  workbench compare A.zarr B.zarr     what changed between two models (e.g. Wan vs Self-Forcing)
  workbench train --config C.yaml     Self-Forcing training (ODE init, DMD, SiD) with attention probes
  workbench export-legacy STORE       the researchers' old per-layer .pt files
  workbench view STORE                a local page: the video beside its per-head attention, live or stored

With no model arguments every command runs on the embedded default: the zoo's Self-Forcing DMD student,
a small causal Wan (6 layers, 4 heads; 21 latent frames in chunks of 3) trained here on a miniature world of
one coloured shape moving the way its prompt says ("a blue circle moving up"), that runs on a CPU in
seconds. generate, extract, evaluate, intervene and info take --model NAME for another model of the zoo,
or --wan-dir DIR for the official Wan2.1 folder and --checkpoint FILE [--use-ema] for a Self-Forcing
checkpoint on top of it (info: --model, --wan-dir or --preset reads configs, not weights; --checkpoint FILE
lists the file's entries and sizes).
"""


# the options that name files and folders: a leading ~ is the home folder, as a shell would expand it (bash leaves
# `--out=~/x` as it is; the store's own files then went to ./~/ and xarray's to the real home, and the run failed);
# evaluate's --model SOURCE is expanded where its spec is parsed (workbench/commands/evaluate.py)
PATH_OPTIONS = ("checkpoint", "config", "image", "logdir", "out", "path", "prompts", "resume", "spec", "store",
                "store_a", "store_b", "video", "wan_dir")


def _expand_home(args) -> None:
    import os

    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v
                                 for v in value])


def _escaping_output() -> None:
    """Make stdout and stderr write what their encoding lacks as escapes: with PYTHONIOENCODING=ascii (or a latin-1
    terminal) a finished run's summary naming 'é' ended in a traceback and exit status 1."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding and encoding != "utf8" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # (a detached or closed stream: left as it is)
                pass


def _undecodable_arguments(args, parser) -> str | None:
    """Why an argument is refused: bytes that are not UTF-8 (a terminal or script in latin-1 sends 'é' as 0xe9;
    Python keeps such a byte as a lone surrogate, which every store, YAML and JSON writer refuses with a
    traceback (a store's path too: its name is checked and recorded). None when all are text. `parser` (the
    command's) names each value by its flag (a positional by its metavar)."""
    names = {a.dest: max(a.option_strings, key=len) if a.option_strings else (a.metavar or a.dest.upper())
             for a in parser._actions}
    for name, value in vars(args).items():
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    return (f"{names.get(name, name)} '{shown}' is not UTF-8 text (a terminal or script in "
                            "another encoding, e.g. latin-1?): give it in UTF-8 (a file or folder of that name: "
                            "rename it; prompts: a UTF-8 file, --prompts FILE)")
    return None


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll says POLLERR for such a write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # (no file descriptor, no poll on this system)
        return False


def _terminate(signum, frame):
    raise Terminated()


def kept_after_interrupt(args, err: BaseException | None = None) -> str:
    """What a command stopped by Ctrl-C or SIGTERM left of its own work (evaluate, train and view say their own):
    the note its store writer attached to the interruption (`StoreWriter.kept_note`: the store's finished samples
    or entries, and whether --overwrite starts over), or generate's finished samples of this run."""
    from pathlib import Path

    if getattr(err, "kept", None):
        return err.kept
    if args.command not in ("extract", "intervene", "generate"):
        return ""
    out = getattr(args, "out", None)
    finished = getattr(args, "finished_samples", None)  # (generate's, once it knows its samples)
    if not out or not Path(out).exists() or finished == []:
        return "Nothing was finished, so nothing is kept."
    if finished is None:  # stopped before the command had its store or samples: nothing of this run is there
        return f"Nothing of this run was finished; {out} is as it was."
    own = f"{len(finished)} of this run's {args.own_samples} sample(s)"
    if getattr(args, "overwrite", False):
        return (f"{out} holds {own}, finished: the same command without --overwrite makes only the others (with it, "
                "all of them again).")
    return f"{out} holds {own}, finished: the same command, run again, makes only the others."


PLUGINS_ENV = "WORKBENCH_PLUGINS"
PLUGINS_GROUP = "workbench.plugins"


def load_plugins(warn=None) -> list[str]:
    """Import the user's modules that extend the workbench, before the command line is read (so that `--stats`
    takes the statistics they `workbench.statistics.register` and `--help` lists them): the modules named in the
    environment variable WORKBENCH_PLUGINS (comma-separated, importable from the current folder or PYTHONPATH) and
    the `workbench.plugins` entry points of installed packages (WORKBENCH_NO_ENTRY_POINTS=1 skips them). Returns the
    names loaded. One that fails is left out with a line to `warn` (default: stderr) naming it and why, what it
    registered before it failed taken back (`_registries`), and the command goes on: a broken plugin must not stop
    the commands that do not need it (`report` reads a store without it; `extract --stats` of its statistic then
    says the statistic is unknown)."""
    import importlib
    import os
    from importlib.metadata import entry_points

    def say(text):
        (warn or (lambda t: print(t, file=sys.stderr)))(f"workbench: warning: {text}")

    loaded = []
    groups = () if os.environ.get("WORKBENCH_NO_ENTRY_POINTS") else entry_points(group=PLUGINS_GROUP)
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    tables = _registries() if groups or names else []
    before = [dict(table) for table in tables]

    def take_back():  # (what the plugin registered before it failed: the registries as before it)
        for table, kept in zip(tables, before):
            table.clear()
            table.update(kept)

    for ep in groups:
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001 - any failure of the user's code: one line naming it
            take_back()
            say(f"the {PLUGINS_GROUP} entry point {ep.name!r} ({ep.value}) failed to load, so it is left out: "
                f"{type(err).__name__}: {err} (WORKBENCH_NO_ENTRY_POINTS=1 skips the entry points)")
            continue
        loaded.append(ep.value)
        before = [dict(table) for table in tables]
    if names and not {"", ".", os.getcwd()} & set(sys.path):  # (a console script's path lacks the current folder)
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            take_back()
            if err.name and (name == err.name or name.startswith(err.name + ".")):  # (the named module is missing)
                say(f"{PLUGINS_ENV}: no module {name!r} (give module names importable from the current folder or "
                    "PYTHONPATH, comma-separated), so it is left out")
            else:  # (a module it imports is missing)
                say(f"{PLUGINS_ENV}: module {name!r} failed to import, so it is left out: {type(err).__name__}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - the module raised: its own error, named
            take_back()
            say(f"{PLUGINS_ENV}: module {name!r} raised {type(err).__name__} while importing, so it is left out "
                f"(what it registered before that is taken back): {err}")
            continue
        loaded.append(name)
        before = [dict(table) for table in tables]
    return loaded


def _registries() -> list[dict]:
    """The tables a plugin registers into: statistics, intervention kinds, cache policies."""
    from workbench import intervene_entries, statistics

    return [statistics.STATISTICS, intervene_entries.OWN_KINDS, intervene_entries.OWN_POLICIES]


class _Version(argparse.Action):
    """`workbench --version`: the version and the commit of this checkout (what a store records), found only
    when asked (git runs)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from workbench import __version__, git_commit

        print(f"workbench {__version__} (git commit {git_commit()})")  # (on stdout, as argparse's own version)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action=_Version, help="print the workbench's version and git commit, and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return help_text.apply(parser)


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    """{command name: its parser} of `build_parser`'s parser."""
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def open_progress_bars() -> list:
    """The tqdm bars open in this process now (none before tqdm is imported)."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    return list(getattr(tqdm, "_instances", ()))


def close_progress_bars(keep=()) -> None:
    """Close the progress bars a command left open (stopped by Ctrl-C or an error), so that the message about it is
    the last line (tqdm draws an open bar again when the process exits, under that message); not those in `keep`
    (`open_progress_bars()` before the command: a notebook's own bar around its calls of `main`)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        if not any(bar is kept for kept in keep):
            bar.close()


def passive_cpu_threads() -> None:
    """OpenMP's idle threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE) unless the environment says
    otherwise, set before torch is imported (its OpenMP runtime reads it once; so `main([...])` called in a notebook
    before torch is imported sets it for that process and what it starts). With the CPU shared (another run, a
    test suite, a browser), spinning threads took the cores the working ones waited for: the default `generate` took
    16.4 s instead of 8.8 s beside one busy torch process on this 2-core machine, 43 s instead of 7 s beside a
    test suite; on an idle machine PASSIVE costs 2-4%. No number changes (the thread count is torch's as before)."""
    if "torch" not in sys.modules:
        import os

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    import os

    passive_cpu_threads()
    load_plugins()
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:  # (refused by the command's own parser: its usage line, not the top-level one)
            command = _subcommands(parser).get(getattr(args, "command", None), parser)
            command.error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as done:  # --help (0) or a flag argparse refused (2, its usage line said why): a status,
        return done.code if isinstance(done.code, int) else 2  # as for any other bad input, from main([...]) too
    _expand_home(args)
    _escaping_output()
    # (a latin-1 terminal's 'é': a traceback at the first JSON or YAML write)
    if bad := _undecodable_arguments(args, _subcommands(parser).get(getattr(args, "command", None), parser)):
        print(f"workbench {args.command}: error: {bad}", file=sys.stderr)
        return 2
    # the command as it was given, for a store's `command` attr: from a shell or from main([...]) in a notebook
    args.argv = ["workbench", *(sys.argv[1:] if argv is None else argv)]
    # the modules that extended the command, named in what a store records (module names: no quoting, so that a
    # shell takes the word as the variable's assignment), so that it runs again as recorded
    if plugins := ",".join(n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()):
        args.argv.insert(0, f"{PLUGINS_ENV}={plugins}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import warnings

    from models.errors import ModelInputError, ModelInputWarning

    show = warnings.showwarning

    def one_line(message, category, *rest, **kw):  # our warnings about the input: one line each
        if issubclass(category, ModelInputWarning):
            print(f"workbench {args.command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    warnings.showwarning = one_line
    import signal

    try:  # SIGTERM stops a command as Ctrl-C does (train installs its own handler while it runs)
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # (not the main thread: main() called from another thread)
        previous = None
    callers_bars = open_progress_bars()
    try:
        try:
            status = args.func(args) or 0
            sys.stdout.flush()  # (a short output waits in the pipe's buffer: a reader gone fails here, not at exit)
            return status
        finally:
            close_progress_bars(keep=callers_bars)
    except ModelInputError as err:  # bad input (WorkbenchError included): one clear line, no traceback
        print(f"workbench {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_status", 2)  # (a store another run is writing: 75, try again later)
    except BrokenPipeError as err:  # `workbench info | head -1`: the reader has gone; quiet, as `cat` would be
        if not _stdout_reader_gone():  # (another pipe broke, e.g. ffmpeg's: an error like any other)
            print(f"workbench {args.command}: error: {err.strerror or err}", file=sys.stderr)
            return 1
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush fails no more)
        except (OSError, ValueError, AttributeError):  # (stdout with no file descriptor: a notebook's)
            pass
        return 141  # 128 + SIGPIPE, a shell's status for a writer whose pipe closed
    except OSError as err:  # a file the command could not read or write (checked up front where it can be)
        where = f" ({err.filename})" if err.filename and str(err.filename) not in str(err.strerror) else ""
        out = getattr(args, "out", None) or getattr(args, "logdir", None) or "its output"
        again = "the same command again with --resume" if args.command == "train" else "the same command again"
        full = (f"; free space where {args.command} writes ({out}), then run {again}: what was finished is kept"
                if err.errno == errno.ENOSPC else "")
        print(f"workbench {args.command}: error: {err.strerror or err}{where}{full}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, no traceback; what a command finished is on disk
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"\nworkbench {args.command}: {how}. {kept_after_interrupt(args, err)}".rstrip(), file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        warnings.showwarning = show
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

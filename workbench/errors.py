"""Errors the workbench reports to users as one clear line (the CLI prints them without a traceback).

`models/` raises `ValueError` / `FileNotFoundError` subclasses of its own (`models.errors`); the CLI treats
those the same way, so a bad layer index or a missing checkpoint reads as a message, not a stack trace.
"""

from models.errors import ModelInputError


class WorkbenchError(ModelInputError):
    """Bad input to a workbench command, found before any work started."""

    exit_status = 2  # the CLI's exit status (workbench/store_lock.py's StoreBusy: 75, try again later)

    @classmethod
    def of(cls, err: Exception) -> "WorkbenchError":
        """err's message as this class, keeping its exit status."""
        wrapped = cls(str(err))
        wrapped.exit_status = getattr(err, "exit_status", 2)
        return wrapped


class Diverged(WorkbenchError):
    """A rollout whose latents are not finite: the model's activations overflowed (its weights are finite, checked
    at load), so there is no video to decode or score. Not bad input: the command ran and failed (exit status 1)."""

    exit_status = 1

    @classmethod
    def rollout(cls, what: str, consequence: str) -> "Diverged":
        """`what` ("the rollout of sample ... is not finite ... from latent frame 3 on"), why, `consequence`, and
        where to look next: one message for every command that meets such a rollout."""
        return cls(f"{what}: the model's activations overflowed (its weights are finite, checked at load); "
                   f"{consequence}. `workbench extract` with the same model, prompt and seed stores where its "
                   "attention stops being finite")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a batch system's walltime), raised where a command is (workbench/cli.py installs
    the handler), so that it stops as on Ctrl-C: a write under way undone, its lock released, one line saying what
    is kept (exit status 143)."""

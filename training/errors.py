"""Errors of `workbench train`: bad configs and requests, reported as one clear line before any work starts."""

from workbench.errors import WorkbenchError


class TrainingError(WorkbenchError):
    """A training request that cannot run as given (the message names the value and what is allowed).
    `TrainingError.of(err)` keeps err's exit status (a log folder another run is writing: 75)."""

"""Errors the workbench reports to users as one clear line (the CLI prints them without a traceback).

`models/` raises `ValueError` / `FileNotFoundError` subclasses of its own (`models.errors`); the CLI treats
those the same way, so a bad layer index or a missing checkpoint reads as a message, not a stack trace.
"""

from models.errors import ModelInputError


class WorkbenchError(ModelInputError):
    """Bad input to a workbench command, found before any work started."""

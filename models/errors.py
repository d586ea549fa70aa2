"""The one exception family for bad input to the models package.

Raised before any work starts (shapes, frame counts, checkpoint keys, missing files, unknown config keys),
always naming the bad value and what is allowed.
"""


class ModelInputError(ValueError):
    """Bad input: the message names the offending value and what would be accepted."""


class CheckpointError(ModelInputError):
    """A checkpoint that cannot be loaded as asked: missing file, wrong keys or shapes, unsafe pickle."""


class WeightsMismatchError(CheckpointError):
    """Weights whose keys or shapes do not fit the model they are loaded into (models/files.py
    `check_tensor_shapes`)."""


class ModelInputWarning(UserWarning):
    """Input the models accept but change (a prompt longer than the text encoder reads): the message says what
    happened to it. The CLI prints these as one line."""

"""The one exception family for bad input to the models package.

Raised before any work starts (shapes, frame counts, checkpoint keys, missing files, unknown config keys),
always naming the bad value and what is allowed.
"""


class ModelInputError(ValueError):
    """Bad input: the message names the offending value and what would be accepted."""


def check_takes(fn, args: str, what: str, caller: str) -> None:
    """Refuse a method of the user's (`what`, e.g. "MyProbe.observe") that cannot be called with the arguments
    `args` ("call, q, k, v": their names) as `caller` calls it: named before any work, not a TypeError mid-rollout."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # (no signature to read: a builtin)
        return
    n = args.count(",") + 1
    try:
        sig.bind(*range(n))
    except TypeError:
        try:  # (a decorator that changes the arguments keeps the wrapped function's signature: its own decides)
            inspect.signature(fn, follow_wrapped=False).bind(*range(n))
        except (TypeError, ValueError):
            raise ModelInputError(f"{what}{sig} must take ({args}), as {caller} calls it") from None


class CheckpointError(ModelInputError):
    """A checkpoint that cannot be loaded as asked: missing file, wrong keys or shapes, unsafe pickle."""


class WeightsMismatchError(CheckpointError):
    """Weights whose keys or shapes do not fit the model they are loaded into (models/files.py
    `check_tensor_shapes`)."""


class ModelInputWarning(UserWarning):
    """Input the models accept but change (a prompt longer than the text encoder reads): the message says what
    happened to it. The CLI prints these as one line."""

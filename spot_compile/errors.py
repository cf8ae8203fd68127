"""User-facing errors. Each message says what was wrong and what to do, on one line.

The CLI prints `SpotError`s without a traceback (``--debug`` shows it); anything else is a bug in spot-compile.
"""


class SpotError(Exception):
    """Base class of every error caused by user input rather than a bug."""


class ModelFileError(SpotError):
    """The user's Python file is missing, broken, or does not define exactly one model."""


class CaptureError(SpotError):
    """torch.export could not capture the model."""


class StructureError(SpotError):
    """The graph holds no prunable transformer blocks (no attention, windowed attention, ...)."""


class BudgetError(SpotError):
    """The budget or the stage choice is out of range or cannot be met."""


class InputSizeError(SpotError):
    """The example input does not fit the model."""


class CheckpointError(SpotError):
    """A checkpoint is missing, corrupt, or was made for another model."""


class DataError(SpotError):
    """A data directory is missing, in a layout spot-compile cannot read, or too small for the run asked for."""


class OutputPathError(SpotError):
    """A file or directory the results are to be written to cannot be written."""


class UsageError(SpotError):
    """An argument of the API is out of its range (batch size, step count, repeats, ...)."""


class ExportError(SpotError):
    """A sparse model that could not be written in an outside format (ONNX), or whose file does not compute what
    the model does."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, short enough for a one-line warning or error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]

"""User-facing errors.

Anything a user can cause (a missing folder, an unsupported model, a bad option) raises a
`CompressError`. The CLI prints its message as one line on stderr and exits with its
`exit_code`; everything else is a bug and keeps its traceback.
"""


class CompressError(Exception):
    """An error caused by the input, reported to the user as one line."""

    exit_code = 2  # documented: 2 = bad input


class ModelLoadError(CompressError):
    """The model could not be found, read or downloaded."""


class UnsupportedModelError(CompressError):
    """The model family has no architecture adapter."""


class DataError(CompressError):
    """A data file is missing, unreadable or empty."""


class ConfigError(CompressError):
    """A stage config holds an invalid value.

    Attributes:
        option: The config field at fault, where there is one (a recipe reports its line).
    """

    def __init__(self, message: str = "", *, option: str | None = None):
        super().__init__(message)
        self.option = option


class OutputExistsError(CompressError):
    """An output would overwrite something the user has, and --overwrite was not given."""


class ResultError(CompressError):
    """The work ran, but its result failed its own check: exit code 1, not 2 (the input was fine)."""

    exit_code = 1


class ExportError(ResultError):
    """An export that does not do what the model does (outputs past tolerance, a shared weight
    stored twice, a projection left unquantized)."""


class TrainingError(ResultError):
    """Fine-tuning diverged (a loss that is not finite); the last saved checkpoint stays."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM: a job scheduler, `timeout`, `kill`). It unwinds
    like Ctrl-C, so that the temporary folders of unfinished outputs are removed on the way out."""


def first_line(e: BaseException, *, with_type: bool = False) -> str:
    """An exception's message as one line for the user: its first line, or its first two where
    the first only announces the second (``Error(s) in loading state_dict for LayerNorm:``
    then the tensor and shapes); the type's name for an empty message.

    Args:
        with_type: Prefix the type's name (``KeyError: 'x'``) unless it is a `CompressError`,
            whose message is written for the user as it is.
    """
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(e).__name__}: {text}" if with_type and not isinstance(e, CompressError) else text

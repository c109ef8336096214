"""The one error hierarchy of the tool.

The core raises these; only the CLI turns them into `error: ...` / `hint: ...`
lines and an exit code. Anything that is not a `MobileOneError` is a bug and
shows a traceback.
"""

from __future__ import annotations

# Exit codes are a documented contract (README, "Exit codes").
EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_VERIFICATION_FAILED = 3
EXIT_EXPORT_FAILED = 4


def printable(text: str) -> str:
    """`text` as one visible line: a key, path or name may hold line breaks or controls."""
    return text if text.isprintable() else repr(text)[1:-1]


class MobileOneError(Exception):
    """A problem the user can fix; carries a one-line message and a hint."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class BadCheckpointError(MobileOneError):
    """The checkpoint cannot be read, or is not a MobileOne the tool understands."""


class UsageError(MobileOneError):
    """Options that contradict each other or the input (e.g. `--ema` without an EMA copy)."""


class OutputError(MobileOneError):
    """The output cannot be written where asked (exists, missing folder, ...)."""


class VerificationFailedError(MobileOneError):
    """A folded or exported model does not compute what the train-time model computes."""

    exit_code = EXIT_VERIFICATION_FAILED


class ExportFailedError(MobileOneError):
    """A converter (torch.onnx, onnxsim, coremltools) failed on a model it should handle."""

    exit_code = EXIT_EXPORT_FAILED


class UnsupportedOpError(ExportFailedError):
    """An exported program uses an op (or op feature) the numpy evaluator cannot check."""


class BadInputError(MobileOneError):
    """Input data the user points at cannot be used (an empty or unreadable image folder)."""

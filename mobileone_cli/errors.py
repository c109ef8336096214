"""The one error hierarchy of the tool: one class per exit code, named for what went wrong.

The core raises these; only the CLI turns them into `error: ...` / `hint: ...`
lines and an exit code. Anything that is not a `MobileOneError` is a bug and
shows a traceback. The README's "Exit codes" table lists the same codes, and
`tests/test_errors.py` holds the two together.
"""

from __future__ import annotations

# Exit codes are a documented contract (README, "Exit codes").
EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_VERIFICATION_FAILED = 3
EXIT_EXPORT_FAILED = 4
EXIT_INTERRUPTED = 130


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


class BadInputError(MobileOneError):
    """Exit 1: a file or folder the user gave cannot be used (read, trusted or written)."""

    exit_code = EXIT_BAD_INPUT


class BadCheckpointError(BadInputError):
    """The checkpoint cannot be read, or is not a model the tool understands."""


class BadArtifactError(BadInputError):
    """An artifact, bundle manifest, image folder or labels file given as input is unusable."""


class OutputError(BadInputError):
    """The output cannot be written where asked (exists, missing folder, not writable...)."""


class UsageError(MobileOneError):
    """Exit 2: options that contradict each other or the input (`--ema` without an EMA copy)."""

    exit_code = EXIT_USAGE


class VerificationFailedError(MobileOneError):
    """Exit 3: a folded or exported model does not compute what the train-time model computes."""

    exit_code = EXIT_VERIFICATION_FAILED


class ExportFailedError(MobileOneError):
    """Exit 4: a converter (torch.onnx, onnxsim, coremltools...) failed on a model it should take."""

    exit_code = EXIT_EXPORT_FAILED


class UnsupportedOpError(ExportFailedError):
    """An exported program uses an op (or op feature) the numpy evaluator cannot check."""


EXIT_CODE_CLASSES: dict[int, type[MobileOneError]] = {
    EXIT_BAD_INPUT: BadInputError,
    EXIT_USAGE: UsageError,
    EXIT_VERIFICATION_FAILED: VerificationFailedError,
    EXIT_EXPORT_FAILED: ExportFailedError,
}
"""The class that stands for each exit code a `MobileOneError` can give."""

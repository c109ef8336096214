"""Keep third-party output off our stdout and stderr, at the file-descriptor level.

Converters write from C++ as well as Python: torch.onnx's TorchScript exporter
dumps the whole IR graph to file descriptor 1 when it fails (190 lines for S0),
and `contextlib.redirect_stdout` cannot see a write that never goes through
`sys.stdout`. So `captured()` points descriptors 1 and 2 at a temporary file
for the duration of a converter call, and `sys.stdout` / `sys.stderr` too (they
are not descriptor-backed under a test runner or when embedded). Whatever was
written is kept, so a failure can quote the converter's last meaningful line.

Standard library only, and `tempfile` and `ctypes` (30-70 ms together) are imported
where used: the CLI imports this module, and `mobileone --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO, TextIO

STDOUT_DESCRIPTOR = 1
STDERR_DESCRIPTOR = 2
# Lines that carry no message of their own: traceback frames, IR dumps, separators.
_NOISE_PREFIXES = ("Traceback ", "File ", "During handling", "The above exception", "%",
                   "graph(", "return (", "^", "~", "-", "=", "#")


class Captured:
    """What was written while captured; `text` and `last_line` may be read inside or after."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._text: str | None = None

    @property
    def text(self) -> str:
        """Everything written to the captured descriptors and streams, in order."""
        if self._text is not None:
            return self._text
        self._file.flush()
        self._file.seek(0)
        text = self._file.read().decode("utf-8", errors="replace")
        self._file.seek(0, os.SEEK_END)
        return text

    def close(self) -> None:
        """Release the temporary file that held the native output."""
        self._text = self.text
        self._file.close()

    def last_line(self, error: BaseException | None = None) -> str:
        """The last line that says something: `error`'s own message first, else the output's."""
        return last_meaningful_line(str(error) if error is not None else "") or \
            last_meaningful_line(self.text) or \
            (type(error).__name__ if error is not None else "")


MEANINGFUL_LINE_LIMIT = 300


def last_meaningful_line(*texts: str) -> str:
    """The last non-empty line of `texts` (later texts first) that is not a traceback frame,
    a caret marker or a graph dump: what a converter's failure comes down to."""
    for text in reversed(texts):
        for line in reversed(text.splitlines()):
            stripped = line.strip()
            if stripped and not stripped.startswith(_NOISE_PREFIXES):
                return stripped[:MEANINGFUL_LINE_LIMIT]
    return ""


@contextlib.contextmanager
def captured(*, stdout: bool = True, stderr: bool = True) -> Iterator[Captured]:
    """Route descriptors 1 and/or 2 (C and Python writes alike) into a `Captured` buffer.

    Descriptors are restored on the way out whatever happens. Where a
    descriptor cannot be duplicated (closed by a daemon), only the Python
    stream is redirected.
    """
    descriptors = [fd for fd, wanted in ((STDOUT_DESCRIPTOR, stdout), (STDERR_DESCRIPTOR, stderr))
                   if wanted]
    buffer = tempfile.TemporaryFile()  # noqa: SIM115 - closed through Captured.close below
    result = Captured(buffer)
    # A text stream on a second handle of the same open file: one shared offset, so Python
    # and C writes interleave in the order they were made.
    stream: TextIO = io.TextIOWrapper(os.fdopen(os.dup(buffer.fileno()), "wb", buffering=0),
                                      encoding="utf-8", errors="replace", write_through=True)
    saved: dict[int, int] = {}
    _flush_python_streams()
    try:
        for descriptor in descriptors:
            try:
                saved[descriptor] = os.dup(descriptor)
            except OSError:
                continue
            os.dup2(buffer.fileno(), descriptor)
        with contextlib.ExitStack() as redirections:
            if stdout:
                redirections.enter_context(contextlib.redirect_stdout(stream))
            if stderr:
                redirections.enter_context(contextlib.redirect_stderr(stream))
            yield result
    finally:
        stream.flush()
        _flush_python_streams()
        for descriptor, copy in saved.items():
            os.dup2(copy, descriptor)
            os.close(copy)
        stream.close()
        result.close()


def _flush_python_streams() -> None:
    """Flush Python's streams and C's stdio buffers, so each write lands where it was aimed.

    C's stdout is fully buffered when it is not a terminal: without `fflush`, a
    converter's buffered lines would reach the real stdout after it is restored.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or detached stream has nothing to flush
            stream.flush()
    with contextlib.suppress(Exception):  # no C library to reach (unusual platforms)
        _c_library().fflush(None)


_C_LIBRARY: list[ctypes.CDLL] = []


def _c_library() -> ctypes.CDLL:
    """The process's C library, whose stdio buffers hold what C code printed."""
    if not _C_LIBRARY:
        _C_LIBRARY.append(ctypes.CDLL(None))
    return _C_LIBRARY[0]

"""What the on-device backends (ExecuTorch, LiteRT, ORT format) share.

Their converters and runtimes are native code that talk a lot: Python
`print`s, loggers at INFO, C++ log lines written straight to file descriptors
1 and 2 (`[cpuinfo_utils.cpp:71] ...`, `INFO: Created TensorFlow Lite XNNPACK
delegate`). The CLI prints data on stdout and its own messages on stderr, so
`quiet` holds all of that while a converter or runtime works and hands the
text back, where a failure's message finds its last meaningful line.

The rest is the shape every on-device candidate has: a fixed batch of 1 run
one sample at a time, a `ValueError` naming the shape for any other size,
and the metadata document the formats embed (labels, normalisation, layout).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import util as importing
from importlib.machinery import PathFinder
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import ExportFailedError, MobileOneError
from mobileone_cli.export.backend import WriteContext
from mobileone_cli.quiet import last_meaningful_line

if TYPE_CHECKING:
    import numpy as np

Runner = Callable[["np.ndarray"], "np.ndarray"]

METADATA_SCHEMA = "mobileone.artifact/1"
"""Names the JSON document `embedded_metadata` writes, so a reader knows its keys."""
LOG_LEVEL = logging.ERROR
# Python-level chatter of the converters' dependencies while they import and work:
# torchao's "Failed to load ... .so" (a CUDA kernel library), torch's pytree deprecation
# of Enum constants (from torchao's import), absl's and onnxruntime's tools' INFO lines.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._export", "torch.export", "absl",
                 "executorch", "litert_torch", "ort_format_model", "jax", "root")
_NOISY_WARNINGS = (FutureWarning, DeprecationWarning, UserWarning, ResourceWarning)


class Captured:
    """The text a `quiet` block held back: Python prints, log records and native output."""

    def __init__(self) -> None:
        self.python = io.StringIO()
        self.native = ""

    @property
    def text(self) -> str:
        """Everything held back: Python's output, then the native output."""
        return self.python.getvalue() + self.native


class _ListHandler(logging.Handler):
    def __init__(self, sink: io.StringIO) -> None:
        super().__init__(level=logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.write(self.format(record) + "\n")


@contextlib.contextmanager
def quiet(*, native: bool = True) -> Iterator[Captured]:
    """Hold back everything a converter or runtime writes while the block runs.

    Python: stdout and stderr go to a buffer, warnings are ignored, and the
    loggers in `NOISY_LOGGERS` record at ERROR and above only, into the same
    buffer (so a failure can quote them). `native`: file descriptors 1 and 2
    are pointed at a temporary file too, for C++ code that writes to them
    directly; whatever else the process writes there meanwhile (a progress
    display's refresh) is held back with it. The text is in the yielded
    `Captured` after the block, also when it raised.
    """
    captured = Captured()
    handler = _ListHandler(captured.python)
    saved_levels = {}
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name if name != "root" else None)
        saved_levels[name] = (logger, logger.level)
        logger.setLevel(LOG_LEVEL)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            for category in _NOISY_WARNINGS:
                warnings.simplefilter("ignore", category)
            if native:
                stack.enter_context(_native_output_to(captured))
            stack.enter_context(contextlib.redirect_stdout(captured.python))
            stack.enter_context(contextlib.redirect_stderr(captured.python))
            yield captured
    finally:
        root.removeHandler(handler)
        for logger, level in saved_levels.values():
            logger.setLevel(level)


@contextlib.contextmanager
def _native_output_to(captured: Captured) -> Iterator[None]:
    """Descriptors 1 and 2 into a temporary file for the block; its text into `captured`."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            saved = [os.dup(descriptor) for descriptor in (1, 2)]
        except OSError:  # a closed descriptor (a daemon): nothing to protect
            yield
            return
        try:
            for descriptor in (1, 2):
                os.dup2(sink.fileno(), descriptor)
            yield
        finally:
            for descriptor, original in zip((1, 2), saved, strict=True):
                os.dup2(original, descriptor)
                os.close(original)
            sink.seek(0)
            captured.native = sink.read().decode("utf-8", errors="replace")


def failure_line(error: BaseException, captured: Captured) -> str:
    """What a converter's failure comes down to: its error's, else its log's last real line."""
    return (last_meaningful_line(str(error)) or last_meaningful_line(captured.text)
            or type(error).__name__)


def missing_modules(modules: Sequence[str], *, target: str, install: str) -> str | None:
    """None when every module can be found; else the one-line reason naming `install`.

    Found without importing anything (executorch and litert-torch take 5-10 s to
    import), so `--to all` can ask every backend cheaply (see `findable`).
    """
    for module in modules:
        if not findable(module):
            return f"the {target} target needs the '{module.split('.')[0]}' package: {install}"
    return None


def findable(module: str) -> bool:
    """Whether `module` (dotted or not) is installed, found without importing its parents.

    `importlib.util.find_spec("a.b")` imports package `a` first. Here each level
    is looked up in its parent's folders instead, so asking for `executorch.exir`
    leaves `executorch` unimported, and coremltools, which imports whatever
    ExecuTorch parts it finds already there, does not pull in the rest of it.
    """
    if module in sys.modules:  # imported already, or set to None: "not installed"
        return sys.modules[module] is not None
    top, *rest = module.split(".")
    try:
        spec = importing.find_spec(top)
        for depth in range(len(rest)):
            if spec is None or spec.submodule_search_locations is None:
                return False
            name = ".".join([top, *rest[: depth + 1]])
            spec = PathFinder.find_spec(name, list(spec.submodule_search_locations))
    except (ImportError, ValueError):  # a broken installation; a module set to None
        return False
    return spec is not None


def pip_extra(extra: str) -> str:
    """The command that installs one of our extras."""
    return f'pip install "mobileone-cli[{extra}]"'


def embedded_metadata(context: WriteContext, *, layout: str) -> str:
    """The JSON document a format without a metadata model of its own keeps (sorted keys).

    Everything an app needs to feed the model and read its output: the input's
    name and layout, the normalisation `(pixels / 255 - mean) / std`, the
    output's name and the class labels, and the caller's key/values.
    """
    document: dict[str, Any] = {
        "schema": METADATA_SCHEMA,
        "input": {"name": context.input_name, "layout": layout,
                  "size": [context.input_size, context.input_size],
                  "mean": list(context.mean), "std": list(context.std), "pixel_range": 255},
        "output": {"name": context.output_name},
        "labels": list(context.labels) if context.labels else None,
        "metadata": dict(sorted(context.metadata.items())),
    }
    return json.dumps(document, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def read_embedded_metadata(text: str | bytes | None) -> dict[str, Any]:
    """`embedded_metadata`'s document back; {} for a file without one (another tool's)."""
    if text is None:
        return {}
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(document, dict) or document.get("schema") != METADATA_SCHEMA:
        return {}
    return document


def metadata_details(document: Mapping[str, Any]) -> dict[str, Any]:
    """What of an embedded document goes into `Declared.details`."""
    if not document:
        return {}
    labels = document.get("labels")
    return {
        "normalization": {key: document["input"][key] for key in ("mean", "std", "pixel_range")},
        "labels": len(labels) if isinstance(labels, list) else 0,
        "metadata": dict(document.get("metadata") or {}),
    }


@contextlib.contextmanager
def converting(converter: str, *, hint: str | None = None) -> Iterator[None]:
    """Run a converter quietly; any failure of it becomes one `ExportFailedError`.

    The message quotes the converter's last meaningful line (of its exception,
    else of what it logged), which is all a user can act on; the traceback is
    the converter's, not ours.
    """
    failure: Exception | None = None
    with quiet() as captured:
        try:
            yield
        except MobileOneError:
            raise
        except Exception as error:  # noqa: BLE001 - a converter raises anything from anywhere
            failure = error
    if failure is not None:
        raise ExportFailedError(f"{converter} failed: {failure_line(failure, captured)}",
                                hint=hint) from None

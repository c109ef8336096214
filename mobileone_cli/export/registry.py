"""The registry of export targets: every `Backend` by its `--to` name.

A new target is one module with the `Backend` shape plus one entry here (and its
name in `options.TARGETS`, which the CLI reads without importing any backend);
the pipeline, `verify`, `verify --manifest` and `report` take it from there.
"""

from __future__ import annotations

from typing import Any

from mobileone_cli.errors import UsageError
from mobileone_cli.export import coreml, executorch, litert, onnx, ort, safetensors
from mobileone_cli.export.backend import Backend

BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (safetensors, onnx, coreml, executorch, litert, ort)
}
"""Every target by its `--to` name, in the order `--to all` writes them."""


def get_backend(name: str) -> Backend:
    """The backend called `name`; a UsageError listing the targets otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown export target '{name}'",
                         hint=f"--to takes {', '.join([*BACKENDS, 'all'])}") from None


def timing_backend(path: str) -> Any | None:
    """The backend of an on-device artifact `report` can time here (one that has a
    `timed_runner(path, *, threads)`: ExecuTorch, LiteRT, ORT), by the path's suffix."""
    backend = backend_for_path(path)
    return backend if backend is not None and hasattr(backend, "timed_runner") else None


def backend_for_path(path: str) -> Backend | None:
    """The backend whose suffix `path` ends in, if any."""
    for backend in BACKENDS.values():
        if path.lower().endswith(backend.suffix):
            return backend
    return None

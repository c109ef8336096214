"""Export targets: the `Backend` protocol every target implements, and the registry.

A backend knows one file format and nothing else: how to write a folded model
into it (`write`) and how to open a written file as something that runs
inputs and says what it declares (`open` -> `Candidate`). Staging, proof,
gates and moving into place are the pipeline's (`export.pipeline`), so a new
target is one module plus one line in `BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mobileone_cli.verify import Verification

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class WriteContext:
    """Everything a backend may need to write one artifact of a folded model."""

    input_size: int
    """Static height = width of the example input (and of static exports)."""
    output_name: str
    """"logits" for a classifier, "features" for a headless backbone."""
    metadata: Mapping[str, str]
    """String key/values to embed wherever the format keeps metadata."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """The normalisation the model expects: (pixels / 255 - mean) / std."""
    labels: tuple[str, ...] | None = None
    options: Any = None
    """The backend's own frozen options object (OnnxOptions, CoreMLOptions, ...)."""
    input_name: str = "image"


@dataclass(frozen=True)
class Declared:
    """What a written artifact says about itself, as read back from the file."""

    runtime: str
    """The runtime that ran it here, e.g. "onnxruntime 1.32.0"."""
    input_name: str
    input_shape: tuple[int | str, ...]
    """As the file declares it; a str is a symbolic axis."""
    output_names: tuple[str, ...]
    layout: str = "NCHW"
    """"NCHW", or "NHWC" for a channels-last input."""
    dtype: str = "float32"
    """Of the input and output tensors."""
    precision: str = "fp32"
    """What the model computes in: "fp32", "fp16", "int8" ..."""
    outputs_probabilities: bool = False
    """The output is soft-maxed probabilities (a Core ML classifier), not logits."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """Format-specific facts for the manifest (opset and IR, deployment target ...)."""

    @property
    def static_size(self) -> int | None:
        """The fixed square input side, or None when height or width is symbolic."""
        height, width = (self.input_shape[1:3] if self.layout == "NHWC"
                         else self.input_shape[2:4])
        if isinstance(height, int) and isinstance(width, int) and height == width:
            return height
        return None


class Candidate(Protocol):
    """A written artifact opened in its own runtime (or evaluator)."""

    declared: Declared

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Normalised float32 N x 3 x H x W in (NCHW whatever the file's layout), output out.

        Raises ValueError when the batch's shape does not fit the file.
        """
        ...


class Backend(Protocol):
    """One export target: a module that writes a format and opens it again."""

    name: str
    """The `--to` value: "onnx", "coreml", "executorch" ..."""
    suffix: str
    """Of the written path: ".onnx", ".mlpackage", ".pte" ..."""
    extra: str | None
    """The pip extra that brings the converter (`mobileone-cli[extra]`); None if always there."""

    def missing(self) -> str | None:
        """None when the converter and runtime import; else why not, in one line."""
        ...

    def write(self, model: torch.nn.Module, path: Path, *, context: WriteContext) -> None:
        """Write the folded model at `path` (a staging path; the pipeline moves it)."""
        ...

    def open(self, path: Path) -> Candidate:
        """The file at `path` in its own runtime; BadArtifactError if it is not one."""
        ...


@dataclass(frozen=True)
class Artifact:
    """One written file (or Core ML package folder) and its proof."""

    path: Path
    format: str
    sha256: str
    bytes: int
    verification: Verification | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "verification": self.verification.to_dict() if self.verification else None,
        }

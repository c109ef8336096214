"""The shape every export target has: `WriteContext` in, `Candidate` out.

A backend knows one file format and nothing else: how to write a folded model
into it (`write`) and how to open a written file in its own runtime (`open`,
giving a `Candidate` that runs inputs and says what the file declares).
Staging, proof, gates and moving into place are the pipeline's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mobileone_cli.results import Compression, Declared

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mobileone_cli.repvit import ModelSpec

COMPRESSION_KEY = "mobileone.compression"
"""Metadata key of a compressed artifact: `results.Compression.to_dict()` as JSON."""

Runner = Callable[["np.ndarray"], "np.ndarray"]
"""Normalised float32 N x 3 x H x W in (NCHW whatever the file's layout), output out."""


@dataclass(frozen=True)
class Quantization:
    """How `export --quantize` asks a backend to compress the artifact it writes."""

    mode: str
    """As the field names it and `compress.TARGET_MODES` lists it: "w8", "pal4", "w8a8", "fp16"
    ..."""
    calibration: np.ndarray | None = None
    """Normalised float32 N x 3 x H x W calibration images (modes that quantize activations)."""
    calibration_method: str | None = None
    """"minmax", "entropy" or "percentile" where the target lets the user choose."""
    keep_float: tuple[str, ...] = ()
    """Folded layer names (`stage1.0.reparam_conv`, `linear`) whose weights stay float."""


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
    family: str = "mobileone"
    """The model family ("mobileone", "repvit"): whose key names a layout means."""
    quantization: Quantization | None = None
    """`export --quantize`: compress what is written; None writes the float model."""
    shared: SharedWork | None = None
    """Work one run's backends share (the ORT file converts the ONNX export); None: none."""


class SharedWork:
    """Intermediate products of one export run, made once for every backend that needs them.

    `--to all` writes an ONNX file and an ORT file converted from the same ONNX export;
    with one `SharedWork` per run the second backend takes the first one's bytes instead
    of tracing and simplifying the model again (S4: 0.9 s under cProfile). Keys name
    everything the product depends on, so a product is only reused for an identical request.
    """

    def __init__(self) -> None:
        self._products: dict[tuple[object, ...], bytes] = {}

    def bytes_of(self, key: tuple[object, ...], make: Callable[[], bytes]) -> bytes:
        """The product `key` names, made by `make` the first time it is asked for."""
        if key not in self._products:
            self._products[key] = make()
        return self._products[key]


@dataclass(frozen=True)
class Candidate:
    """A written artifact opened in its own runtime (or evaluator).

    `run` computes as the artifact's runtime does. For an artifact that stores
    or computes in reduced precision, `run_full_precision` runs the same stored
    weights with float32 arithmetic where the evaluator can, and `as_torch`
    turns the folded model into the torch module the artifact is a conversion
    of (normalisation folded into the stem, a softmax appended...): the
    conversion proof compares the two with the artifact's weights rounded
    alike, and `run` then measures the cost of the precision. Both runners
    raise ValueError on a batch whose shape does not fit the file.
    """

    declared: Declared
    run: Runner
    run_full_precision: Runner | None = None
    as_torch: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    stored_weights: Callable[[], Mapping[str, np.ndarray]] | None = None
    """A compressed artifact: parameter name (`stage1.0.reparam_conv.weight`, and `....bias`
    where the artifact stores it quantized) -> its value as the artifact computes with it
    (decompressed, float32), for the weight check and the proof.
    `run_full_precision` then computes with these weights, float32 arithmetic and float
    activations, so the torch module holding them is its exact reference."""
    spec: ModelSpec | None = None
    state: Mapping[str, torch.Tensor] | None = None
    """A weights-only file (safetensors) as read back: the architecture and the canonical
    tensors it holds. When they are the proven fold's, bit for bit (rounded to the file's
    precision), the file computes exactly what that model computed, so the proof compares the
    tensors and reuses the fold's outputs instead of running the same weights again; else
    the file is run (`pipeline.prove_artifact`)."""

    sha256: str | None = None
    """The sha256 of the bytes the candidate was read from, when opening it hashed them (a
    safetensors file); the artifact's record takes it rather than hashing the file again."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """`run`: the artifact as its runtime computes it."""
        return self.run(batch)


class Backend(Protocol):
    """One export target: a module of `mobileone_cli.export` that writes a format and opens it."""

    name: str
    """The `--to` value: "onnx", "coreml", "executorch" ..."""
    suffix: str
    """Of the written path: ".onnx", ".mlpackage", ".pte" ..."""
    extra: str | None
    """The pip extra that brings the converter (`mobileone-cli[extra]`); None if always there."""

    def missing(self) -> str | None:
        """None when the converter and runtime import; else why not, in one line."""
        ...

    def write(self, model: torch.nn.Module, path: Path, *,
              context: WriteContext) -> torch.nn.Module | None:
        """Write the folded model at `path` (a staging path; the pipeline moves it).

        With `context.quantization`, writes the compressed artifact. Returns the
        tight reference of a quantized artifact when only the writer can build it
        (the PT2E-converted torch module, taking normalised NCHW float32 and
        returning what the artifact returns); None otherwise.
        """
        ...

    def companions(self, path: Path) -> tuple[Path, ...]:
        """Files `write` puts beside `path` that ship with it (moved, hashed, listed)."""
        ...

    def open(self, path: Path) -> Candidate:
        """The file at `path` in its own runtime; BadArtifactError if it is not one."""
        ...


def read_compression(metadata: Mapping[str, str]) -> Compression | None:
    """The compression record a file's metadata holds (`COMPRESSION_KEY`), if any."""
    text = metadata.get(COMPRESSION_KEY)
    if not text:
        return None
    try:
        return Compression.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def first_line(error: BaseException) -> str:
    """The first line of a converter's error message, the one worth showing."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check_fits(array: np.ndarray, expected: tuple[int | str | None, ...], *, name: str) -> None:
    """ValueError unless `array` is float32 and fits `expected` (an int fixes that axis).

    A fixed batch (of 1) accepts any multiple of it: the caller runs the batch in chunks.
    """
    import numpy as np

    shape = " x ".join(str(size if isinstance(size, int) else size or "?") for size in expected)
    got = " x ".join(map(str, array.shape))
    if array.dtype != np.float32 or array.ndim != len(expected):
        raise ValueError(f"{name} takes a float32 array of shape {shape}; got {array.dtype} {got}")
    batch, *rest = expected
    mismatched = any(size != actual for size, actual in zip(rest, array.shape[1:], strict=True)
                     if isinstance(size, int))
    uneven_batch = isinstance(batch, int) and len(array) % batch != 0
    if mismatched or uneven_batch:
        raise ValueError(f"{name} takes input of shape {shape}; got {got}")


def in_chunks(run_one: Runner, array: np.ndarray, *, batch: int | None) -> np.ndarray:
    """`run_one` over `array` in slices of a fixed `batch` (None: all at once), concatenated."""
    import numpy as np

    if batch is None or batch >= len(array):
        return run_one(array)
    return np.concatenate([run_one(array[start : start + batch])
                           for start in range(0, len(array), batch)])

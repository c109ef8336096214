"""Cheap checks of options and inputs, run before the fold so a mistake costs no minute of work.

Pure functions that raise `UsageError` / `BadArtifactError` / `BadCheckpointError` with one
line and a hint; the
CLI's parameter types call them at parse time, the core calls the ones that need a loaded
checkpoint right after loading it. Nothing heavy is imported at module level: the list of
Core ML targets is data here, so `--target` is checked without importing coremltools.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mobileone_cli.errors import (
    BadArtifactError,
    BadCheckpointError,
    UsageError,
    VerificationFailedError,
    printable,
)
from mobileone_cli.manifest import ManifestError, check_relative

if TYPE_CHECKING:
    import numpy as np
    import torch

# -- numbers -----------------------------------------------------------------------------------


def finite_number(value: float, *, option: str) -> float:
    """`value` when it is a finite number; NaN and infinities compare false with every limit."""
    if not math.isfinite(value):
        raise UsageError(f"{option} {value} is not a finite number",
                         hint=f"give {option} a number such as 1e-4")
    return value


# What one verification run holds at once at the largest activation: MobileOne's stem (at
# most 64 channels, at half the input side) for the 2-image square batch, in float64 (the
# reference run), three such tensors alive (input, branch sum, output). At 224 px: 39 MB.
STEM_CHANNELS = 64
REFERENCE_BATCH = 2
FLOAT64_BYTES = 8
LIVE_TENSORS = 3


def reference_bytes(size: int) -> int:
    """A lower bound of the memory the reference run needs at `--input-size size`."""
    side = -(-size // 2)
    return LIVE_TENSORS * REFERENCE_BATCH * STEM_CHANNELS * side * side * FLOAT64_BYTES


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_input_size(size: int, *, option: str = "--input-size",
                     available: int | None = None) -> int:
    """Refuse a size whose reference run cannot fit in this machine's available memory."""
    free = available_memory() if available is None else available
    needed = reference_bytes(size)
    if free is not None and needed > free:
        side = -(-size // 2)
        raise UsageError(
            f"{option} {size} needs at least {needed / 1e9:,.1f} GB for the reference run "
            f"({LIVE_TENSORS} x {REFERENCE_BATCH} x {STEM_CHANNELS} x {side} x {side} float64 "
            f"activations), and {free / 1e9:,.1f} GB is available",
            hint=f"use a smaller {option}; 224 is the ImageNet size")
    return size


# -- Core ML targets ---------------------------------------------------------------------------
# The members of `coremltools.target` (coremltools 9.0) that can hold an ML Program (iOS15 and
# its contemporaries or later), and the older ones. tests/test_validation.py compares them
# with the installed coremltools, so a new release that adds a target fails a test, not a user.
COREML_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18", "iOS26",
                  "macOS12", "macOS13", "macOS14", "macOS15", "macOS26",
                  "watchOS8", "watchOS9", "watchOS10", "watchOS11", "watchOS26",
                  "tvOS15", "tvOS16", "tvOS17", "tvOS18", "tvOS26")
COREML_TOO_OLD = ("iOS13", "iOS14", "macOS10_15", "macOS10_16", "macOS11",
                  "watchOS6", "watchOS7", "tvOS13", "tvOS14")


def check_coreml_target(name: str) -> str:
    """`name` when it is a Core ML deployment target that can hold an ML Program."""
    if name in COREML_TARGETS:
        return name
    if name in COREML_TOO_OLD:
        raise UsageError(f"--target {name} is too old for an ML Program",
                         hint="choose iOS15 / macOS12 / watchOS8 / tvOS15 or later")
    raise UsageError(f"--target {printable(name)!r} is not a Core ML deployment target",
                     hint=f"choose one of {', '.join(COREML_TARGETS)}")


# -- labels ------------------------------------------------------------------------------------
LABELS_HINT = "--labels takes a UTF-8 text file, one distinct label a line, in class-index order"


def parse_labels(data: bytes, *, source: str) -> tuple[str, ...]:
    """The labels of a --labels file: UTF-8, one a line, blank lines skipped, all distinct."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadArtifactError(f"labels file {source} is not UTF-8 (byte {error.start} is "
                         f"0x{data[error.start]:02x})", hint=LABELS_HINT) from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise BadArtifactError(f"labels file {source} holds no labels", hint=LABELS_HINT)
    repeated = [(label, count) for label, count in Counter(labels).most_common() if count > 1]
    if repeated:
        label, count = repeated[0]
        others = f" (and {len(repeated) - 1} more repeated labels)" if len(repeated) > 1 else ""
        raise BadArtifactError(f"labels file {source} repeats {printable(label)!r} {count} times"
                         f"{others}; a classifier's labels must be distinct", hint=LABELS_HINT)
    return labels


def read_labels_file(path: Path) -> tuple[str, ...]:
    """Read and parse a --labels file (at most 64 MiB: 1000 ImageNet labels take 20 KB)."""
    try:
        with path.open("rb") as stream:
            data = stream.read(64 << 20)
    except OSError as error:
        raise BadArtifactError(f"cannot read labels file {path} ({error.strerror})",
                         hint=LABELS_HINT) from None
    return parse_labels(data, source=str(path))


def check_label_count(labels: tuple[str, ...], *, num_classes: int | None, source: str) -> None:
    """The labels must name every class of the classifier, no more, no fewer."""
    if num_classes is None:
        raise UsageError("--labels needs a classifier, and this checkpoint is a headless backbone",
                         hint="drop --labels")
    if len(labels) != num_classes:
        raise BadArtifactError(f"labels file has {len(labels)} labels, the model has {num_classes} "
                         "classes", hint=f"give {source} one line per class, in class-index order")


# -- values beyond a dtype's range -------------------------------------------------------------
DTYPE_RANGES = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38,
                "float32": 3.4028234663852886e38}


def check_fits_dtype(state: Mapping[str, torch.Tensor], dtype: str, *,
                     name: Callable[[str], str] | None = None) -> None:
    """A finite tensor that would become infinite in `dtype` fails verification (exit 3)."""
    limit = DTYPE_RANGES[dtype]
    for key, value in state.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        if DTYPE_RANGES.get(str(value.dtype).removeprefix("torch."), math.inf) <= limit:
            continue  # a finite value of a narrower dtype always fits
        largest = float(value.detach().abs().max())
        if math.isfinite(largest) and largest > limit:
            shown = name(key) if name else key
            raise VerificationFailedError(
                f"'{printable(shown)}' holds {largest:.6g}, beyond {dtype}'s range of "
                f"±{limit:.6g}; a {dtype} file would hold infinities; nothing was written",
                hint="keep --dtype float32" + (" (or bfloat16, whose range is float32's)"
                                               if dtype == "float16" else ""))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a dense CPU tensor is finite (True for a non-float tensor).

    Checked in numpy, on one thread: torch spreads each check of a large tensor over every
    core, and on a busy machine each of a checkpoint's hundreds of checks then waits for a
    descheduled thread (measured on the 511 floating-point tensors of an S4 checkpoint, two
    threads on a loaded two-core machine: torch 1.6-3.4 s, numpy 15-18 ms).
    """
    import numpy as np
    import torch

    if not tensor.is_floating_point():
        return True
    values = tensor.detach()
    if values.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds each value
        values = values.float()
    return bool(np.isfinite(values.numpy()).all())


def check_folded_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Folded weights beyond float32's range come from extreme inputs, not from a fold bug."""
    for key, value in state.items():
        if not all_finite(value):
            raise BadCheckpointError(
                f"folding gives '{printable(key)}' values beyond float32's range "
                f"(±{DTYPE_RANGES['float32']:.4g}): the checkpoint's weights or BatchNorm "
                "statistics are too extreme to fold",
                hint="the training run diverged or the file is corrupt")


def check_reference_finite(outputs: Iterable[np.ndarray]) -> None:
    """The train-time model must give finite outputs on the inputs it is verified with."""
    import numpy as np

    if not all(bool(np.isfinite(output).all()) for output in outputs):
        raise BadCheckpointError(
            "the train-time model's own float32 outputs are infinite or NaN on the "
            "verification inputs: its weights are too extreme to verify a fold against",
            hint="the training run diverged or the file is corrupt")


# -- ONNX files given to `verify` --------------------------------------------------------------
def check_onnx_file(path: Path) -> None:
    """A readable ONNX model whose external data, if any, stays inside its folder."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as error:
        raise BadArtifactError(f"{path} is not an ONNX model ({type(error).__name__})",
                                 hint="pass an .onnx file written by `mobileone export`") from None
    if not model.graph.input:
        raise BadArtifactError(f"{path} is not an ONNX model (its graph has no input)",
                                 hint="pass an .onnx file written by `mobileone export`")
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data
                         if entry.key == "location"), "")
        try:
            check_relative(location, where=f"external data of '{tensor.name}'")
        except ManifestError:
            raise BadArtifactError(
                f"{path}: external data of '{printable(tensor.name)}' is at "
                f"{printable(location)!r}, outside the model's folder; it is not read",
                hint="keep an ONNX model's external data files beside it") from None


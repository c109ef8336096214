"""Evaluate saved Core ML ML Programs with numpy (and torch's float32 convolution).

Core ML runs predictions only on Apple platforms, and no tool checks a Core ML
export numerically anywhere else. This module reads what `coremltools` saved
in an `.mlpackage` (the MIL program in `Data/com.apple.CoreML/model.mlmodel`
and its weights in `Data/com.apple.CoreML/weights/weight.bin`) and evaluates
the program's `main` function op by op, so an export can be compared with the
torch model it came from. Every op is evaluated from what the program declares
(its weights, pads, strides, groups, dtypes); only a convolution's float32
multiply-adds are handed to `torch.nn.functional.conv*d`, which accumulates in
float32 as the numpy einsum over window views it replaced did, and took the S4
fp16 package's proof from 5.0 s to 1.7 s.

Arithmetic follows the dtypes the program declares: every op's result is
rounded once to the dtype of its output. A program converted with
`compute_precision=FLOAT16` therefore loses precision where the device does.
Within an op, fp16 convolutions and matrix products accumulate in float32 and
round the finished sum (bias included) to float16, which is approximately what
fp16 GPU and Neural Engine hardware does (wide accumulators, fp16 storage);
mean, softmax, sigmoid and batch_norm are computed in float32 and rounded
once; elementwise +, -, *, / on fp16 are exact IEEE fp16 (numpy computes them
in float32 and rounds once, which gives the correctly rounded fp16 result).
On the test models it stays within a quarter of the fp16 tolerance of torch's
CPU float16 evaluation (tests/test_mil.py).

Facts about saved programs this module relies on (coremltools 9):

- Image inputs (`ct.ImageType(scale=..., bias=[...])`): the program's input is
  an fp32 tensor N x C x H x W with channels in the input's color layout, and
  the scale and bias are ordinary MIL ops at the top of `main`, a `mul` named
  `<input>__scaled__` and an `add` named `<input>__biased__`. Evaluating the
  program on 0-255 pixel values therefore applies the preprocessing the device
  applies; nothing is stored in the spec's description.
- Classifiers (`ct.ClassifierConfig(labels)`): the program ends in a
  `classify` op whose outputs are the spec's `predictedFeatureName` (the top
  label) and `predictedProbabilitiesName` (Core ML turns it into a dict from
  label to probability). `run_program` returns, under those names, the index
  of the top class in the label list and the probability tensor itself, whose
  entry i belongs to label i.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import BadArtifactError, ExportFailedError, UnsupportedOpError, UsageError
from mobileone_cli.quiet import captured

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class ProgramSummary:
    """What a saved ML Program declares: its inputs and outputs, and which ops it runs."""

    function: str
    """The evaluated function, always `main`."""
    inputs: tuple[tuple[str, str, tuple[int | str, ...]], ...]
    """(name, MIL dtype such as `fp32`, shape); an unknown dimension is `"?"`."""
    outputs: tuple[str, ...]
    """Output names in program order (equal to the spec's output feature names)."""
    op_counts: dict[str, int]
    """Op type -> count, sorted by type; `const` ops (weights and parameters) are not counted."""


def summarize_program(package: Path) -> ProgramSummary:
    """Describe the `main` function of a saved `.mlpackage` without evaluating it."""
    program = _read_program(package)
    counts = Counter(op.type for op in program.block.operations if op.type != "const")
    return ProgramSummary(
        function=_FUNCTION,
        inputs=tuple(
            (named.name, _dtype_name(named.type), _shape(named.type))
            for named in program.function.inputs
        ),
        outputs=tuple(program.block.outputs),
        op_counts=dict(sorted(counts.items())),
    )


ARITHMETICS = ("declared", "fp32", "fp32-float-activations")


def run_program(package: Path, inputs: dict[str, np.ndarray], *,
                arithmetic: str = "declared") -> dict[str, np.ndarray]:
    """Evaluate the main function of a saved ML Program on numpy inputs; returns outputs by name.

    `arithmetic="declared"` rounds every result to the dtype the program
    declares for it, as the device computes. `"fp32"` widens every fp16 value
    (stored weights included, which stay exactly as stored) to float32 and
    treats casts to fp16 as no-ops: the program's own ops and weights with
    float32 arithmetic, which an fp16 program's conversion proof compares.
    `"fp32-float-activations"` is `"fp32"` with every quantize/dequantize pair
    of an activation (`w8a8`) passed through: the stored weights, float
    activations, what a compressed program's conversion proof compares.

    Every input of the program must be given, with its declared shape; values
    are converted to the declared dtype (as Core ML converts an fp32 array
    passed to an fp16 input). Outputs come back in their declared dtype. A
    classifier's label output holds the top class index (0-d int64) and its
    probabilities output the probability tensor, entry i for label i.
    Raises `UnsupportedOpError` naming the first op type the evaluator does
    not know, before any arithmetic is done.
    """
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, not {arithmetic!r}")
    program = _read_program(package)
    values = _run(program, inputs, widen=arithmetic != "declared",
                  float_activations=arithmetic == "fp32-float-activations")
    return {name: values[name] for name in program.block.outputs}


def trace_program(package: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate like `run_program`, but return every value the program computes, by name.

    The inputs, then the output of every op that is not a `const` (compressed
    weights decompressed by `constexpr_*` ops included), in program order. This
    is what activation calibration needs: the range each intermediate tensor
    takes, under the names the program gives them.
    """
    program = _read_program(package)
    values = _run(program, inputs)
    constants = {
        output.name
        for op in program.block.operations
        if op.type == "const"
        for output in op.outputs
    }
    return {name: value for name, value in values.items() if name not in constants}


def _run(program: _Program, inputs: Mapping[str, np.ndarray], *,
         widen: bool = False, float_activations: bool = False) -> dict[str, Any]:
    """Every value the program computes, by name (see `run_program` for `widen`)."""
    _check_supported(program)
    values = _bind_inputs(program, inputs)
    weights = _WeightFiles(program.model_dir)
    for op in program.block.operations:
        _evaluate(op, values, weights, widen=widen, float_activations=float_activations)
    return values


# --- Reading the package ----------------------------------------------------------------

_FUNCTION = "main"
_MANIFEST = "Manifest.json"
# Weight paths in the program are written relative to the model file's folder.
_MODEL_PATH_PREFIX = "@model_path/"


@dataclass(frozen=True)
class _Program:
    package: Path
    model_dir: Path
    function: Any  # MIL_pb2.Function
    block: Any  # MIL_pb2.Block, the function's body for its opset


def read_spec(package: Path) -> Any:
    """The package's root model (a `Model_pb2.Model`), read without writing anything.

    coremltools' `load_spec` opens a package through libmodelpackage, which saves
    `Manifest.json` again when it closes (same bytes, a new modification time):
    `verify` must not touch what it verifies, so the manifest is read as JSON here.
    """
    with quiet_coremltools():
        from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    model_file = _root_model_file(package)
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except (OSError, DecodeError) as error:
        raise BadArtifactError(
            f"cannot read the Core ML model {model_file}: {error}",
            hint="write the package again with coremltools' MLModel.save",
        ) from error
    return spec


def _read_program(package: Path) -> _Program:
    model_file = _root_model_file(package)
    spec = read_spec(package)
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise BadArtifactError(
            f"{package} holds a Core ML {kind} model, not an ML Program",
            hint="convert with convert_to='mlprogram'",
        )
    functions = spec.mlProgram.functions
    if _FUNCTION not in functions:
        raise BadArtifactError(
            f"the ML Program in {package} has no '{_FUNCTION}' function "
            f"(it has: {', '.join(sorted(functions)) or 'none'})"
        )
    function = functions[_FUNCTION]
    return _Program(
        package=package,
        model_dir=model_file.parent,
        function=function,
        block=function.block_specializations[function.opset],
    )


def _root_model_file(package: Path) -> Path:
    """The model file the package's manifest names as its root item."""
    manifest_file = package / _MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadArtifactError(
            f"{package} is not a readable .mlpackage: {manifest_file} is missing or malformed",
            hint="pass the folder written by coremltools' MLModel.save",
        ) from error
    return package / "Data" / root


# torch 2.13 deprecates torch.jit.trace (and trace_method, which it calls); coremltools
# converts TorchScript, and the torch.export path is a different, beta frontend.
_TRACE_DEPRECATED = r"`torch\.jit\.trace(_method)?` is deprecated"
# coremltools drops the TemporaryDirectory of its weights without closing it.
_TEMPORARY_DIRECTORY = r"Implicitly cleaning up"
_CHATTY_LOGGERS = ("coremltools", "torch", "torch.utils._pytree", "torchao")
# What coremltools 9 imports whole at its own import, only to learn whether it is there
# (`coremltools._deps`), and this tool never needs of it: scikit-learn (its converters,
# which coremltools disables past scikit-learn 1.5.1 anyway), transformers (probed, used by
# nothing outside coremltools' tests), ExecuTorch and torchao (the torch frontend's support
# for ExecuTorch programs and torchao ops; this tool converts TorchScript of a float model).
# An `[all]` install has all four: 4.8 of the 6.2 s `import coremltools` took there.
_UNUSED_PROBES = ("sklearn", "transformers", "executorch", "torchao")


@contextmanager
def quiet_coremltools() -> Iterator[None]:
    """Silence coremltools while it imports and converts, so the CLI prints nothing extra.

    Its log lines (untested torch version, no Core ML runtime off a Mac) go
    through the `coremltools` logger, which a level mutes. Its progress bars are
    tqdm's, which obeys TQDM_DISABLE only if set before tqdm's first import
    (`import torch` has done that already), so stderr, where tqdm draws, is
    redirected instead. Python warnings (renamed outputs, torch's deprecation
    of tracing) are filtered by message.

    The first time, coremltools is imported here, with the probes it never needs
    for this tool (`_UNUSED_PROBES`) answered "not installed" unless they are
    imported already; they import normally afterwards, for coremltools too, which
    keeps only its own flags (`coremltools._deps._HAS_*`) as it found them.
    """
    # coremltools imports torchao when it is installed (executorch brings it), whose import
    # logs a deprecation through torch's own logger (`torch.utils._pytree`).
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        # Descriptor-level: importing coremltools imports torchao, whose C++ loader and
        # torch's C++ logging write to descriptor 2, which redirect_stderr cannot see.
        with warnings.catch_warnings(), captured():
            warnings.filterwarnings("ignore", message=_TRACE_DEPRECATED, category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*has been renamed")
            warnings.filterwarnings("ignore", message=_TEMPORARY_DIRECTORY,
                                    category=ResourceWarning)
            import_coremltools()
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def import_coremltools() -> Any:
    """The coremltools module; imported the first time with each of `_UNUSED_PROBES` not
    yet imported seen as absent (`quiet_coremltools` silences that import)."""
    if "coremltools" not in sys.modules:
        blocked = [name for name in _UNUSED_PROBES if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
        try:
            import coremltools  # noqa: F401
        finally:
            for name in blocked:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
    return sys.modules["coremltools"]


# MIL dtype -> _BlobStorageReader method. fp16 comes back as raw uint16 bits; sub-byte types
# (compressed weights: palette indices, int4 data) come back unpacked, one element per byte.
_BLOB_READERS = {
    "uint1": "read_uint1_data",
    "uint2": "read_uint2_data",
    "uint3": "read_uint3_data",
    "uint4": "read_uint4_data",
    "uint6": "read_uint6_data",
    "int4": "read_int4_data",
    "fp16": "read_fp16_data",
    "fp32": "read_float_data",
    "int8": "read_int8_data",
    "uint8": "read_uint8_data",
    "int16": "read_int16_data",
    "uint16": "read_uint16_data",
    "int32": "read_int32_data",
    "uint32": "read_uint32_data",
}


class _WeightFiles:
    """Opens each weight file once, with coremltools' blob reader (it works off a Mac)."""

    def __init__(self, model_dir: Path) -> None:
        self._model_dir = model_dir
        self._readers: dict[Path, Any] = {}

    def read(self, file_name: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        import numpy as np

        method = _BLOB_READERS.get(dtype)
        if method is None:
            raise UnsupportedOpError(f"cannot read {dtype} weights from {file_name}")
        flat = getattr(self._reader(file_name), method)(offset)
        if dtype == "fp16":
            flat = flat.view(np.float16)
        return np.asarray(flat).reshape(shape)

    def _reader(self, file_name: str) -> Any:
        path = self._resolve(file_name)
        if path not in self._readers:
            with quiet_coremltools():
                from coremltools.libmilstoragepython import _BlobStorageReader
            self._readers[path] = _BlobStorageReader(str(path))
        return self._readers[path]

    def _resolve(self, file_name: str) -> Path:
        relative = file_name.removeprefix(_MODEL_PATH_PREFIX)
        path = (self._model_dir / relative).resolve()
        # A weight path that leaves the package is a broken (or hostile) model, not data to read.
        if not path.is_relative_to(self._model_dir.resolve()) or not path.is_file():
            raise BadArtifactError(f"weight file {file_name} is missing from the package")
        return path


# --- Types and values -------------------------------------------------------------------

# MIL proto DataType names -> the names MIL itself prints (`fp16`, `int32`, ...).
_DTYPE_NAMES = {
    "UINT1": "uint1",
    "UINT2": "uint2",
    "UINT3": "uint3",
    "UINT4": "uint4",
    "UINT6": "uint6",
    "INT4": "int4",
    "BOOL": "bool",
    "STRING": "string",
    "FLOAT16": "fp16",
    "FLOAT32": "fp32",
    "FLOAT64": "fp64",
    "BFLOAT16": "bf16",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
}
# MIL dtypes numpy can compute in (the others are storage formats of compressed weights).
_NUMPY_DTYPES = {
    "bool": "bool",
    "fp16": "float16",
    "fp32": "float32",
    "fp64": "float64",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
}
# Sub-byte storage types of compressed weights -> (bits, signed). They are read into the
# smallest numpy integer that holds them, one element per byte (uint8, or int8 for int4).
_SUB_BYTE_DTYPES = {
    "uint1": (1, False),
    "uint2": (2, False),
    "uint3": (3, False),
    "uint4": (4, False),
    "uint6": (6, False),
    "int4": (4, True),
}
UNKNOWN_DIMENSION = "?"


def _dtype_name(value_type: Any) -> str:
    """The MIL dtype of a tensor ValueType, or the kind of a non-tensor type (`list`, ...)."""
    from coremltools.proto import MIL_pb2

    kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        return str(kind).removesuffix("Type")
    name = MIL_pb2.DataType.Name(value_type.tensorType.dataType)
    return _DTYPE_NAMES.get(name, name.lower())


def _shape(value_type: Any) -> tuple[int | str, ...]:
    if value_type.WhichOneof("type") != "tensorType":
        return ()
    return tuple(
        int(dimension.constant.size)
        if dimension.WhichOneof("dimension") == "constant"
        else UNKNOWN_DIMENSION
        for dimension in value_type.tensorType.dimensions
    )


def _numpy_dtype(dtype: str, *, where: str) -> np.dtype[Any]:
    import numpy as np

    if dtype not in _NUMPY_DTYPES:
        raise UnsupportedOpError(f"{where} has dtype {dtype}, which the evaluator cannot compute")
    return np.dtype(_NUMPY_DTYPES[dtype])


def _value(value: Any, weights: _WeightFiles, *, where: str) -> Any:
    """A MIL Value as numpy: tensors as arrays (scalars 0-d), strings as str, lists as list."""
    kind = value.type.WhichOneof("type")
    if kind == "listType":
        return [_value(item, weights, where=where) for item in value.immediateValue.list.values]
    if kind != "tensorType":
        raise UnsupportedOpError(f"{where} is a {kind} value, which the evaluator cannot read")
    dtype = _dtype_name(value.type)
    shape = _shape(value.type)
    if UNKNOWN_DIMENSION in shape:
        raise UnsupportedOpError(f"{where} is a constant of unknown shape {shape}")
    known_shape = tuple(int(size) for size in shape)
    if value.WhichOneof("value") == "blobFileValue":
        blob = value.blobFileValue
        return weights.read(blob.fileName, blob.offset, dtype, known_shape)
    return _immediate_tensor(value.immediateValue.tensor, dtype, known_shape, where=where)


def _immediate_tensor(tensor: Any, dtype: str, shape: tuple[int, ...], *, where: str) -> Any:
    import numpy as np

    field = tensor.WhichOneof("value")
    if field == "strings":
        strings = [str(item) for item in tensor.strings.values]
        return strings[0] if shape == () else np.array(strings).reshape(shape)
    if dtype in _SUB_BYTE_DTYPES and field == "bytes":
        return _unpack_bits(tensor.bytes.values, dtype, shape)
    numpy_dtype = _numpy_dtype(dtype, where=where)
    if field == "bytes":
        # fp16, int8 and uint8 values are stored as their raw little-endian bytes.
        return np.frombuffer(tensor.bytes.values, dtype=numpy_dtype).reshape(shape).copy()
    items = getattr(tensor, str(field)).values  # floats, doubles, ints, longInts, bools
    return np.array(list(items), dtype=numpy_dtype).reshape(shape)


def _unpack_bits(packed: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Sub-byte elements packed as MIL packs them: from each byte's least significant bit up.

    An element may straddle two bytes (6-bit indices); its low bits come first. Signed
    types (int4) are two's complement within their bits.
    """
    import numpy as np

    bits, signed = _SUB_BYTE_DTYPES[dtype]
    count = math.prod(shape)
    stream = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")
    if stream.size < count * bits:
        raise ExportFailedError(f"a packed {dtype} constant holds fewer than {count} elements")
    fields = stream[: count * bits].reshape(count, bits).astype(np.int16)
    values = (fields << np.arange(bits, dtype=np.int16)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values.astype(np.int8 if signed else np.uint8).reshape(shape)


def _bind_inputs(program: _Program, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    import numpy as np

    expected = {named.name: named.type for named in program.function.inputs}
    if set(inputs) != set(expected):
        raise UsageError(
            f"the program in {program.package} takes inputs {sorted(expected)}, "
            f"got {sorted(inputs)}"
        )
    values: dict[str, Any] = {}
    for name, value_type in expected.items():
        array = np.asarray(inputs[name])
        shape = _shape(value_type)
        if not _shape_matches(array.shape, shape):
            raise UsageError(
                f"input '{name}' has shape {tuple(array.shape)}; the program expects {shape}"
            )
        dtype = _numpy_dtype(_dtype_name(value_type), where=f"input '{name}'")
        values[name] = array.astype(dtype)
    return values


def _shape_matches(actual: tuple[int, ...], declared: tuple[int | str, ...]) -> bool:
    return len(actual) == len(declared) and all(
        size in (UNKNOWN_DIMENSION, got) for got, size in zip(actual, declared, strict=True)
    )


# --- Evaluating ops ---------------------------------------------------------------------

_REQUIRED = object()
_CONSTEXPR = "constexpr_"


@dataclass(frozen=True)
class _Op:
    """One op's inputs, already evaluated: each name holds one value, or several for variadics."""

    type: str
    output: str
    inputs: Mapping[str, tuple[Any, ...]]

    def arg(self, name: str, default: Any = _REQUIRED) -> Any:
        if name in self.inputs:
            return self.inputs[name][0]
        if default is _REQUIRED:
            raise ExportFailedError(f"op {self.type} ('{self.output}') has no input '{name}'")
        return default

    def args(self, name: str) -> tuple[Any, ...]:
        return self.inputs.get(name, ())

    def ints(self, name: str, default: Sequence[int]) -> tuple[int, ...]:
        value = self.arg(name, None)
        return tuple(default) if value is None else tuple(int(item) for item in value)

    def where(self) -> str:
        return f"op {self.type} (output '{self.output}')"


def _check_supported(program: _Program) -> None:
    for op in program.block.operations:
        if op.type != "const" and op.type not in _OPS:
            raise UnsupportedOpError(
                f"cannot evaluate op '{op.type}' (output '{op.outputs[0].name}') "
                f"in {program.package}: the numpy evaluator does not implement it",
                hint=f"ops it implements: const, {', '.join(sorted(_OPS))}",
            )


def _evaluate(op: Any, values: dict[str, Any], weights: _WeightFiles, *, widen: bool,
              float_activations: bool = False) -> None:
    """Run one op and store its outputs in `values`, rounded to their declared dtypes.

    `widen`: fp16 results and constants become float32 instead (see `run_program`).
    `float_activations`: a quantize or dequantize of a float value passes it through.
    """
    output = op.outputs[0].name
    if op.type == "const":
        # A const op holds its value in the `val` attribute, not in its inputs.
        value = _value(op.attributes["val"], weights, where=f"const '{output}'")
        values[output] = _widened(value) if widen else value
        return
    arguments = {
        key: tuple(_argument(binding, values, weights, op.type) for binding in arg.arguments)
        for key, arg in op.inputs.items()
    }
    if op.type.startswith(_CONSTEXPR):
        # iOS 16's constexpr ops keep their parameters in attributes, iOS 18's in inputs.
        for key, attribute in op.attributes.items():
            if key != "name" and key not in arguments:
                arguments[key] = (_value(attribute, weights, where=f"{op.type} '{output}'"),)
    call = _Op(type=op.type, output=output, inputs=arguments)
    if float_activations and op.type in ("quantize", "dequantize"):
        value = call.arg("input")
        if getattr(value, "dtype", None) is not None and value.dtype.kind == "f":
            values[output] = _widened(value)
            return
    if widen and op.type == "cast" and str(call.arg("dtype")) == "fp16":
        values[output] = _widened(call.arg("x"))
        return
    results = _OPS[op.type](call)
    if len(op.outputs) == 1:
        results = (results,)
    # A decompressed weight is stored as the device holds it (fp16 in an fp16 program), so
    # widening keeps its rounding: "fp32" arithmetic computes with the weights as stored.
    stored = op.type.startswith(_CONSTEXPR)
    for declared, result in zip(op.outputs, results, strict=True):
        value = _conform(result, declared, call, widen=widen and not stored)
        values[declared.name] = _widened(value) if widen and stored else value


def _widened(value: Any) -> Any:
    """An fp16 array as float32 (exactly: every fp16 value is a float32 value); else as it is."""
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


def _argument(binding: Any, values: Mapping[str, Any], weights: _WeightFiles, op_type: str) -> Any:
    if binding.WhichOneof("binding") == "value":
        return _value(binding.value, weights, where=f"an immediate input of {op_type}")
    if binding.name not in values:
        raise ExportFailedError(f"op {op_type} reads '{binding.name}' before it is defined")
    return values[binding.name]


def _conform(result: Any, declared: Any, op: _Op, *, widen: bool = False) -> Any:
    """Round a tensor result to its declared dtype and check its shape against the program's.

    `widen`: a result declared fp16 is kept in float32 instead.
    """
    import numpy as np

    dtype = _dtype_name(declared.type)
    if dtype not in _NUMPY_DTYPES:
        return result  # strings, dicts: only the classify op makes them
    if widen and dtype == "fp16":
        dtype = "fp32"
    array = np.asarray(result).astype(_NUMPY_DTYPES[dtype], copy=False)
    shape = _shape(declared.type)
    if not _shape_matches(array.shape, shape):
        # The evaluator and coremltools disagree about the op: a bug, never a silent pass.
        raise ExportFailedError(
            f"{op.where()} evaluated to shape {tuple(array.shape)}, "
            f"but the program declares {shape}"
        )
    return array


def _float32(*arrays: np.ndarray) -> list[np.ndarray]:
    """Widen fp16 operands to float32, the accumulator of fp16 hardware; fp32 stays as is."""
    import numpy as np

    return [np.asarray(array).astype(np.promote_types(array.dtype, np.float32)) for array in arrays]


# Elementwise: numpy on two fp16 arrays computes in float32 and rounds once, i.e. exact IEEE fp16.
def _add(op: _Op) -> np.ndarray:
    return op.arg("x") + op.arg("y")


def _sub(op: _Op) -> np.ndarray:
    return op.arg("x") - op.arg("y")


def _mul(op: _Op) -> np.ndarray:
    return op.arg("x") * op.arg("y")


def _real_div(op: _Op) -> np.ndarray:
    return op.arg("x") / op.arg("y")


def _relu(op: _Op) -> np.ndarray:
    import numpy as np

    x = op.arg("x")
    return np.maximum(x, np.zeros((), dtype=x.dtype))


def _sigmoid(op: _Op) -> np.ndarray:
    import numpy as np

    (x,) = _float32(op.arg("x"))
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)) for large negative x.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


_GELU_MODES = ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")


def _gelu(op: _Op) -> np.ndarray:
    """x * Phi(x): EXACT with erf (what torch's default `nn.GELU()` converts to), or the
    tanh and sigmoid approximations coremltools also emits, computed in float64."""
    import numpy as np
    import torch

    mode = str(op.arg("mode", "EXACT"))
    if mode not in _GELU_MODES:
        raise ExportFailedError(f"{op.where()} has gelu mode {mode!r}",
                                hint=f"modes it implements: {', '.join(_GELU_MODES)}")
    x = np.asarray(op.arg("x")).astype(np.float64)
    if mode == "EXACT":
        # numpy has no erf; torch's float64 erf is correctly rounded to double precision.
        return 0.5 * x * (1.0 + torch.special.erf(torch.from_numpy(x / np.sqrt(2.0))).numpy())
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return x * 0.5 * (1.0 + np.tanh(0.5 * 1.702 * x))


def _softmax(op: _Op) -> np.ndarray:
    import numpy as np

    (x,) = _float32(op.arg("x"))
    axis = int(op.arg("axis", -1))
    exponentials = np.exp(x - x.max(axis=axis, keepdims=True))
    return exponentials / exponentials.sum(axis=axis, keepdims=True)


def _cast(op: _Op) -> np.ndarray:
    import numpy as np

    dtype = _numpy_dtype(str(op.arg("dtype")), where=op.where())
    return np.asarray(op.arg("x")).astype(dtype)


def _reduce_mean(op: _Op) -> np.ndarray:
    import numpy as np

    (x,) = _float32(op.arg("x"))
    axes = op.arg("axes", None)
    axis = None if axes is None else tuple(int(item) for item in axes)
    return np.mean(x, axis=axis, keepdims=bool(op.arg("keep_dims", False)))


def _batch_norm(op: _Op) -> np.ndarray:
    import numpy as np

    x, mean, variance = _float32(op.arg("x"), op.arg("mean"), op.arg("variance"))
    gamma = op.arg("gamma", None)
    beta = op.arg("beta", None)
    epsilon = float(op.arg("epsilon", 1e-5))
    # Statistics are per channel, axis 1: give them trailing unit axes to broadcast.
    channel = (-1,) + (1,) * (x.ndim - 2)
    scale = 1.0 / np.sqrt(variance + epsilon)
    if gamma is not None:
        scale = scale * gamma.astype(np.float32)
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.astype(np.float32)
    return x * scale.reshape(channel) + shift.reshape(channel)


def _linear(op: _Op) -> np.ndarray:
    x, weight = _float32(op.arg("x"), op.arg("weight"))
    result = x @ weight.T
    bias = op.arg("bias", None)
    if bias is not None:
        result = result + _float32(bias)[0]
    return result


def _matmul(op: _Op) -> np.ndarray:
    import numpy as np

    x, y = _float32(op.arg("x"), op.arg("y"))
    if bool(op.arg("transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if bool(op.arg("transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _conv(op: _Op) -> np.ndarray:
    import numpy as np
    import torch
    import torch.nn.functional as F

    # fp16 operands are widened: the sum accumulates in float32 and `_conform` rounds it to
    # fp16 once, as fp16 hardware roughly does, instead of rounding after every addition.
    x, weight = _float32(op.arg("x"), op.arg("weight"))
    spatial = x.ndim - 2
    convolutions = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    if spatial not in convolutions:
        raise UnsupportedOpError(f"{op.where()} is a {spatial}-d convolution, which the "
                                 "evaluator lacks")
    groups = int(op.arg("groups", 1))
    kernel = weight.shape[2:]
    strides = op.ints("strides", (1,) * spatial)
    dilations = op.ints("dilations", (1,) * spatial)
    pads = _padding(op, x.shape[2:], kernel, strides, dilations)
    # The program's own pads (asymmetric ones included) are applied here, and torch's float32
    # convolution does the multiply-adds: a conv as the program declares it, computed by
    # oneDNN instead of a numpy einsum over window views (see the module docstring).
    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    bias = op.arg("bias", None)
    with torch.inference_mode():
        result = convolutions[spatial](
            torch.from_numpy(np.ascontiguousarray(padded)),
            torch.from_numpy(np.ascontiguousarray(weight)),
            None if bias is None else torch.from_numpy(_float32(bias)[0].reshape(-1)),
            stride=tuple(strides), dilation=tuple(dilations), groups=groups)
    return result.numpy()


def _avg_pool(op: _Op) -> np.ndarray:
    import numpy as np

    (x,) = _float32(op.arg("x"))
    if bool(op.arg("ceil_mode", False)):
        raise UnsupportedOpError(f"{op.where()} uses ceil_mode, which the evaluator lacks")
    spatial = x.ndim - 2
    kernel = op.ints("kernel_sizes", ())
    strides = op.ints("strides", (1,) * spatial)
    dilations = (1,) * spatial
    pads = _padding(op, x.shape[2:], kernel, strides, dilations)
    window_axes = tuple(range(-spatial, 0))
    sums = _windows(x, kernel, strides, dilations, pads).sum(axis=window_axes)
    if bool(op.arg("exclude_padding_from_average", False)):
        ones = np.ones((1, 1, *x.shape[2:]), dtype=np.float32)
        counts = _windows(ones, kernel, strides, dilations, pads).sum(axis=window_axes)
        return sums / counts
    return sums / math.prod(kernel)


def _padding(
    op: _Op,
    size: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    """(before, after) padding of each spatial axis, from MIL's pad_type and pad."""
    pad_type = str(op.arg("pad_type", "valid"))
    if pad_type == "valid":
        return [(0, 0)] * len(size)
    if pad_type == "custom":
        pad = op.ints("pad", (0,) * 2 * len(size))
        return [(pad[2 * axis], pad[2 * axis + 1]) for axis in range(len(size))]
    if pad_type not in ("same", "same_lower"):
        raise UnsupportedOpError(f"{op.where()} has pad_type '{pad_type}'")
    pads = []
    for length, extent, stride, dilation in zip(size, kernel, strides, dilations, strict=True):
        # As coremltools' aggregated_pad: pad so the output has ceil(length / stride) positions.
        dilated = (extent - 1) * dilation + 1
        total = max(0, (math.ceil(length / stride) - 1) * stride + dilated - length)
        # "same" puts the odd extra element after, "same_lower" before.
        before = total // 2 if pad_type == "same" else total - total // 2
        pads.append((before, total - before))
    return pads


def _windows(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> np.ndarray:
    """A view N, C, *out, *kernel of the zero-padded input: every window a conv or pool sees."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    view = np.pad(x, [(0, 0), (0, 0), *pads])
    for axis, (extent, dilation) in enumerate(zip(kernel, dilations, strict=True), start=2):
        # Each call appends one window axis at the end: N, C, *out, *kernel once done.
        view = sliding_window_view(view, (extent - 1) * dilation + 1, axis=axis)
    positions = tuple(slice(None, None, stride) for stride in strides)
    taps = tuple(slice(None, None, dilation) for dilation in dilations)
    return view[(slice(None), slice(None), *positions, *taps)]


def _reshape(op: _Op) -> np.ndarray:
    x = op.arg("x")
    shape = [int(size) for size in op.arg("shape")]
    # A 0 copies the dimension of x at the same place counted from the right (1 if there is
    # none): iOS 17's rule, which is iOS 15's whenever the ranks agree. -1 is inferred.
    offset = x.ndim - len(shape)
    resolved = [
        size if size != 0 else (x.shape[index + offset] if index + offset >= 0 else 1)
        for index, size in enumerate(shape)
    ]
    return x.reshape(resolved)


def _squeeze(op: _Op) -> np.ndarray:
    import numpy as np

    axes = op.arg("axes", None)
    axis = None if axes is None else tuple(int(item) for item in axes)
    return np.squeeze(op.arg("x"), axis=axis)


def _expand_dims(op: _Op) -> np.ndarray:
    import numpy as np

    # MIL axes, like numpy's, index the output, so negative axes count from its end.
    return np.expand_dims(op.arg("x"), tuple(int(item) for item in op.arg("axes")))


def _transpose(op: _Op) -> np.ndarray:
    import numpy as np

    return np.transpose(op.arg("x"), tuple(int(item) for item in op.arg("perm")))


def _concat(op: _Op) -> np.ndarray:
    import numpy as np

    if bool(op.arg("interleave", False)):
        raise UnsupportedOpError(f"{op.where()} interleaves, which the evaluator lacks")
    return np.concatenate(op.args("values"), axis=int(op.arg("axis")))


def _classify(op: _Op) -> tuple[np.ndarray, np.ndarray]:
    """(top label index, probabilities): the two outputs Core ML turns into label and dict."""
    import numpy as np

    probabilities = op.arg("probabilities")
    # coremltools requires as many classes as probabilities, so the tensor is one row.
    return np.asarray(np.argmax(probabilities.reshape(-1))), probabilities


# --- Compressed weights and quantized activations ----------------------------------------
# Semantics from coremltools 9's op definitions (mil/ops/defs/iOS16/constexpr_ops.py,
# iOS17/quantization_ops.py, iOS18/compression.py) and the reference arithmetic they call
# (coremltools.optimize._utils): dequantizing computes in float32 and rounds once to the
# output dtype; quantizing divides in the input's dtype, rounds half to even, adds the zero
# point and clips to the output type's range.


def _along_axis(parameter: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """A scalar or per-axis vector parameter shaped to broadcast against a rank-`rank` tensor."""
    import numpy as np

    parameter = np.asarray(parameter)
    if parameter.ndim == 0 or parameter.ndim == rank:
        return parameter
    if axis is None:
        raise ExportFailedError("a vector scale or zero point comes without an axis")
    shape = [1] * rank
    shape[axis % rank] = parameter.size
    return parameter.reshape(shape)


def _affine_dequantize(
    data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None
) -> np.ndarray:
    """scale * (data - zero_point), in float32; `_conform` rounds to the scale's dtype."""
    import numpy as np

    result = np.asarray(data).astype(np.float32)
    if zero_point is not None:
        result = result - _along_axis(zero_point, result.ndim, axis).astype(np.float32)
    return result * _along_axis(scale, result.ndim, axis).astype(np.float32)


def _optional_axis(op: _Op) -> int | None:
    axis = op.arg("axis", None)
    return None if axis is None else int(axis)


def _constexpr_affine_dequantize(op: _Op) -> np.ndarray:
    """iOS 16: int8/uint8 weights with a scalar or per-axis scale and zero point."""
    return _affine_dequantize(
        op.arg("quantized_data"), op.arg("scale"), op.arg("zero_point"), int(op.arg("axis"))
    )


def _repeat_blocks(parameter: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each entry of a block-wise parameter repeated over its block of a `shape` tensor."""
    import numpy as np

    if parameter.ndim != len(shape) or any(
        size % blocks for size, blocks in zip(shape, parameter.shape, strict=True)
    ):
        raise ExportFailedError(
            f"a block-wise parameter of shape {parameter.shape} does not tile data of {shape}"
        )
    for axis, (size, blocks) in enumerate(zip(shape, parameter.shape, strict=True)):
        parameter = np.repeat(parameter, size // blocks, axis=axis)
    return parameter


def _constexpr_blockwise_shift_scale(op: _Op) -> np.ndarray:
    """iOS 18: scale[block] * (data - offset[block]); blocks tile the data along every axis."""
    import numpy as np

    data = np.asarray(op.arg("data")).astype(np.float32)
    scale = _repeat_blocks(np.asarray(op.arg("scale")), data.shape).astype(np.float32)
    offset = op.arg("offset", None)
    if offset is not None:
        data = data - _repeat_blocks(np.asarray(offset), data.shape).astype(np.float32)
    return scale * data


def _constexpr_lut_to_dense(op: _Op) -> np.ndarray:
    """Palettized weights: each index replaced by its entry in the look-up table.

    iOS 16: one table (a vector of 2^bits entries), indices packed into uint8 bytes
    and the output `shape` given. iOS 18: indices of a sub-byte type with the output's
    shape, and a table of rank K + 2 (one table per block of the first K axes, then
    2^bits entries of VECTOR_SIZE values).
    """
    import numpy as np

    lut = np.asarray(op.arg("lut"))
    if "shape" in op.inputs:
        shape = tuple(int(size) for size in op.arg("shape"))
        bits = round(math.log2(lut.size))
        packed = np.asarray(op.arg("indices"), dtype=np.uint8).tobytes()
        indices = _unpack_bits(packed, f"uint{bits}", shape) if bits < 8 else (
            np.frombuffer(packed, dtype=np.uint8)[: math.prod(shape)].reshape(shape)
        )
        return lut[indices.astype(np.int64)]
    indices = np.asarray(op.arg("indices")).astype(np.int64)
    if lut.ndim != indices.ndim + 2:
        raise ExportFailedError(f"{op.where()}: lut rank {lut.ndim} != indices rank + 2")
    if lut.shape[-1] != 1:
        raise UnsupportedOpError(f"{op.where()} uses vector palettization, which the evaluator lacks")
    # One table per block: repeat each table over its block, then pick index per element.
    tables = _repeat_blocks(lut[..., 0], (*indices.shape, lut.shape[-2]))
    return np.take_along_axis(tables, indices[..., None], axis=-1)[..., 0]


def _constexpr_cast(op: _Op) -> np.ndarray:
    import numpy as np

    dtype = _numpy_dtype(str(op.arg("output_dtype")), where=op.where())
    return np.asarray(op.arg("source_val")).astype(dtype)


_INTEGER_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _quantize(op: _Op) -> np.ndarray:
    """clip(round(input / scale) + zero_point) to int8 or uint8; round half to even."""
    import numpy as np

    output_dtype = str(op.arg("output_dtype"))
    if output_dtype not in _INTEGER_RANGES:
        raise UnsupportedOpError(f"{op.where()} quantizes to {output_dtype}")
    x = np.asarray(op.arg("input"))
    axis = _optional_axis(op)
    # The division happens in the input's dtype (fp16 or fp32), as coremltools computes it.
    quantized = np.around(x / _along_axis(op.arg("scale"), x.ndim, axis).astype(x.dtype))
    zero_point = op.arg("zero_point", None)
    quantized = quantized.astype(np.float32)
    if zero_point is not None:
        quantized = quantized + _along_axis(zero_point, x.ndim, axis).astype(np.float32)
    low, high = _INTEGER_RANGES[output_dtype]
    return np.clip(quantized, low, high).astype(output_dtype)


def _dequantize(op: _Op) -> np.ndarray:
    """scale * (input - zero_point), computed in float32 and rounded to the scale's dtype."""
    return _affine_dequantize(
        op.arg("input"), op.arg("scale"), op.arg("zero_point", None), _optional_axis(op)
    )


_OPS: dict[str, Callable[[_Op], Any]] = {
    "add": _add,
    "avg_pool": _avg_pool,
    "batch_norm": _batch_norm,
    "cast": _cast,
    "classify": _classify,
    "concat": _concat,
    "constexpr_affine_dequantize": _constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": _constexpr_blockwise_shift_scale,
    "constexpr_cast": _constexpr_cast,
    "constexpr_lut_to_dense": _constexpr_lut_to_dense,
    "conv": _conv,
    "dequantize": _dequantize,
    "expand_dims": _expand_dims,
    "gelu": _gelu,
    "linear": _linear,
    "matmul": _matmul,
    "mul": _mul,
    "quantize": _quantize,
    "real_div": _real_div,
    "reduce_mean": _reduce_mean,
    "relu": _relu,
    "reshape": _reshape,
    "sigmoid": _sigmoid,
    "softmax": _softmax,
    "squeeze": _squeeze,
    "sub": _sub,
    "transpose": _transpose,
}

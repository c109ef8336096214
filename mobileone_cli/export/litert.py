"""The folded model as a LiteRT (TensorFlow Lite) flatbuffer, proven in LiteRT's interpreter.

LiteRT is the runtime Android apps ship for on-device models (`.tflite`).
litert-torch (Google's PyTorch -> LiteRT converter, formerly ai-edge-torch)
converts the model from `torch.export` through StableHLO; `open` runs the
written file in `ai-edge-litert`'s `Interpreter`, which applies the XNNPACK
delegate as on a phone's CPU.

Shape: fixed, batch 1, one signature (`serving_default`) with one input named
`image` and one output named `logits` (or `features`). `LiteRTOptions
(channels_last=True)` gives a 1 x S x S x 3 (NHWC) input, the layout Android's
camera and bitmap pipelines hand over (litert-torch's `to_channel_last_io`:
one transpose inside the model, which the converter folds into the first
conv). The candidate still takes NCHW batches, as every candidate does, and
transposes them; `Declared.layout` says "NHWC". A feature map output stays NCHW.

Metadata: a flatbuffer's `metadata` table holds named byte buffers. The file
gets two: `mobileone` (JSON: input name, layout and size, the normalisation
`(pixels / 255 - mean) / std`, output name, the tool's key/values) and
`mobileone.labels` (UTF-8, one class label per line, when there are labels).
They are not TFLite Support's `TFLITE_METADATA` schema, which the ML Kit/Task
Library read: that needs the `tflite-support` package (last released 2023,
not installable beside numpy 2), so an app reads ours by name
(`Interpreter.get_metadata`-style flatbuffer access, or Netron). Adding them
means re-packing the flatbuffer (`ai_edge_litert.schema_py_generated`'s
object API); weight buffers are re-aligned to 16 bytes on the way (the
converter's own are only 4-byte aligned).

Reproducibility: litert-torch writes the same bytes for the same model
(checked in two processes with different PYTHONHASHSEED), and the re-pack is
deterministic. Conversion is slow (S0 / S4 at 224 px: 16 / 26 s on 2 busy
cores) and prints progress to stdout unless told not to
(LITERT_TORCH_SHOW_PROGRESS, set to "n" while `write` runs).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import BadArtifactError, UsageError
from mobileone_cli.export.backend import Candidate, WriteContext, check_fits, in_chunks
from mobileone_cli.export.runtimes import (
    Runner,
    converting,
    embedded_metadata,
    metadata_details,
    missing_modules,
    pip_extra,
    quiet,
    read_embedded_metadata,
)
from mobileone_cli.options import LiteRTOptions
from mobileone_cli.results import Declared
from mobileone_cli.versions import version_of

if TYPE_CHECKING:
    import numpy as np
    import torch

name = "tflite"
suffix = ".tflite"
extra = "litert"

SIGNATURE = "serving_default"
METADATA_NAME = "mobileone"
LABELS_NAME = "mobileone.labels"
FILE_IDENTIFIER = b"TFL3"
BUFFER_ALIGNMENT = 16
_MODULES = ("litert_torch", "ai_edge_litert.interpreter")
_PROGRESS_VARIABLE = "LITERT_TORCH_SHOW_PROGRESS"
_PRECISIONS = {"float32": "fp32", "float16": "fp16", "int8": "int8", "uint8": "uint8"}


def missing() -> str | None:
    """None when litert-torch and ai-edge-litert are installed; else the pip command."""
    return missing_modules(_MODULES, target=name, install=pip_extra(extra))


def companions(path: Path) -> tuple[Path, ...]:
    """Nothing ships beside this target's file."""
    return ()


def write(model: torch.nn.Module, path: Path, *, context: WriteContext) -> None:
    """Convert the folded model with litert-torch and write the `.tflite` at `path`."""
    import torch

    options = context.options if context.options is not None else LiteRTOptions()
    if not isinstance(options, LiteRTOptions):
        raise UsageError(f"the tflite target takes LiteRTOptions, not {type(options).__name__}")
    layout = "NHWC" if options.channels_last else "NCHW"
    size = context.input_size
    example = torch.zeros((1, size, size, 3) if options.channels_last else (1, 3, size, size))
    with _no_progress(), converting("litert-torch's conversion",
                                    hint="report it with the model's variant and the "
                                         "litert-torch version"):
        import litert_torch

        body = (litert_torch.to_channel_last_io(model.eval(), args=[0])
                if options.channels_last else model.eval())
        named = _named(body, input_name=context.input_name, output_name=context.output_name)
        converted = litert_torch.convert(named, sample_kwargs={context.input_name: example})
        converted.export(str(path))
    entries = {METADATA_NAME: embedded_metadata(context, layout=layout).encode()}
    if context.labels:
        entries[LABELS_NAME] = "".join(f"{label}\n" for label in context.labels).encode()
    path.write_bytes(with_metadata(path.read_bytes(), entries))


def _named(model: torch.nn.Module, *, input_name: str, output_name: str) -> torch.nn.Module:
    """`model` with its input and output named: the signature takes the keyword's name,
    and a dict output names the output (else litert-torch says "output_0")."""
    import torch

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            return {output_name: self.model(inputs[input_name])}

    return Named()


@contextlib.contextmanager
def _no_progress() -> Iterator[None]:
    """litert-torch draws its progress on stdout with rich unless this variable says no."""
    saved = os.environ.get(_PROGRESS_VARIABLE)
    os.environ[_PROGRESS_VARIABLE] = "n"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_PROGRESS_VARIABLE, None)
        else:
            os.environ[_PROGRESS_VARIABLE] = saved


def with_metadata(flatbuffer: bytes, entries: dict[str, bytes]) -> bytes:
    """`flatbuffer` (a LiteRT model) with `entries` in its metadata table, re-packed.

    An entry whose name is there already gets the new bytes in its place; a
    new one is appended. Every buffer is packed 16-byte aligned. Deterministic.
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    model.metadata = model.metadata or []
    existing = {entry.name.decode(): entry for entry in model.metadata}
    for entry_name, data in entries.items():
        buffer = schema.BufferT()
        buffer.data = data
        if entry_name in existing:  # same name: new bytes in its buffer, its place kept
            model.buffers[existing[entry_name].buffer] = buffer
            continue
        model.buffers.append(buffer)
        metadata = schema.MetadataT()
        metadata.name = entry_name.encode()
        metadata.buffer = len(model.buffers) - 1
        model.metadata.append(metadata)
    model.buffers = [_AlignedBuffer.of(buffer) for buffer in model.buffers]
    return _pack(model)


def _pack(model: Any) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


class _AlignedBuffer:
    """A `BufferT` that packs its bytes 16-byte aligned (the object API's numpy path aligns to 1)."""

    def __init__(self, data: bytes | None, offset: int, size: int) -> None:
        self.data = data
        self.offset = offset
        self.size = size

    @classmethod
    def of(cls, buffer: Any) -> _AlignedBuffer:
        import numpy as np

        data = buffer.data
        if data is not None and not isinstance(data, bytes):
            data = np.asarray(data, dtype=np.uint8).tobytes()
        return cls(data, buffer.offset, buffer.size)

    def Pack(self, builder: Any) -> int:  # the flatbuffers object API calls it by this name
        from ai_edge_litert import schema_py_generated as schema

        data = None
        if self.data is not None:
            builder.StartVector(1, len(self.data), BUFFER_ALIGNMENT)
            builder.head = builder.head - len(self.data)
            builder.Bytes[builder.head : builder.head + len(self.data)] = self.data
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return int(schema.BufferEnd(builder))


def read_metadata(flatbuffer: bytes) -> dict[str, bytes]:
    """The metadata table of a LiteRT flatbuffer: name -> bytes."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    entries = {}
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        buffer = model.Buffers(entry.Buffer())
        entries[entry.Name().decode()] = buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
    return entries


def _interpreter(path: Path, *, threads: int | None = None) -> Any:
    """LiteRT's interpreter of the file at `path`, tensors allocated; BadArtifactError if
    it is not a LiteRT model (checked before the native code parses it)."""
    data = path.read_bytes()
    if data[4:8] != FILE_IDENTIFIER:
        raise BadArtifactError(f"{path.name} is not a LiteRT (.tflite) model",
                                 hint="pass a .tflite written by `mobileone export --to tflite`")
    failure: Exception | None = None
    with quiet():
        from ai_edge_litert.interpreter import Interpreter

        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
            return interpreter
        except (RuntimeError, ValueError) as error:
            failure = error
    raise BadArtifactError(f"{path.name} is not a valid LiteRT model: {failure}",
                             hint="pass a .tflite written by `mobileone export --to tflite`")


def open(path: Path) -> Candidate:
    """The `.tflite` at `path` in LiteRT's interpreter (XNNPACK): what it declares, and a run."""
    import numpy as np

    interpreter = _interpreter(path)
    entries = read_metadata(path.read_bytes())
    declared = _declared(path, interpreter, entries)
    channels_last = declared.layout == "NHWC"
    runner = interpreter.get_signature_runner(SIGNATURE)
    batch = declared.input_shape[0]
    nchw = ((batch, declared.input_shape[3], *declared.input_shape[1:3]) if channels_last
            else declared.input_shape)
    output_name = declared.output_names[0]

    def run_one(array: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(array.transpose(0, 2, 3, 1) if channels_last else array)
        with quiet():
            outputs = runner(**{declared.input_name: feed})
        return np.asarray(outputs[output_name], dtype=np.float32)

    def run(array: np.ndarray) -> np.ndarray:
        check_fits(array, nchw, name=path.name)
        return in_chunks(run_one, array, batch=batch if isinstance(batch, int) else None)

    return Candidate(declared=declared, run=run, run_full_precision=run)


def _declared(path: Path, interpreter: Any, entries: dict[str, bytes]) -> Declared:
    signatures = interpreter.get_signature_list()
    if SIGNATURE not in signatures or len(signatures[SIGNATURE]["inputs"]) != 1:
        raise BadArtifactError(f"{path.name} has no '{SIGNATURE}' signature with one input "
                                 f"(signatures: {sorted(signatures)})",
                                 hint="pass a .tflite of an image model, written by mobileone")
    signature = signatures[SIGNATURE]
    details = interpreter.get_signature_runner(SIGNATURE).get_input_details()
    input_name = signature["inputs"][0]
    shape = tuple(int(size) for size in details[input_name]["shape"])
    document = read_embedded_metadata(entries.get(METADATA_NAME))
    layout = (document.get("input") or {}).get("layout") or (
        "NHWC" if len(shape) == 4 and shape[3] == 3 and shape[1] != 3 else "NCHW")
    dtypes = {detail["dtype"].__name__ for detail in interpreter.get_tensor_details()}
    precision = next((_PRECISIONS[kind] for kind in ("int8", "uint8", "float16")
                      if kind in dtypes), "fp32")
    # The interpreter's only listing of its ops is private; a LiteRT without it lists none.
    listing = getattr(interpreter, "_get_ops_details", list)
    operators = Counter(op["op_name"] for op in listing())
    runtime_version = entries.get("min_runtime_version", b"").rstrip(b"\0").decode() or None
    return Declared(
        runtime=f"ai-edge-litert {version_of('ai-edge-litert') or 'unknown'}",
        input_name=input_name,
        input_shape=shape,
        output_names=tuple(signature["outputs"]),
        layout=layout,
        dtype=details[input_name]["dtype"].__name__,
        precision=precision,
        details={"signature": SIGNATURE, "min_runtime_version": runtime_version,
                 "operators": dict(sorted(operators.items())),
                 **metadata_details(document)},
    )


def timed_runner(path: Path, *, threads: int) -> Runner:
    """The bare `invoke` of the `.tflite`, for latency: input exactly as the file declares it.

    `threads` is the interpreter's `num_threads`, which its XNNPACK delegate
    uses too (per interpreter, not process-wide). The first call is made here.
    """
    import numpy as np

    interpreter = _interpreter(path, threads=threads)
    input_index = interpreter.get_input_details()[0]["index"]
    input_shape = tuple(interpreter.get_input_details()[0]["shape"])
    output_index = interpreter.get_output_details()[0]["index"]
    with quiet():
        interpreter.set_tensor(input_index, np.zeros(input_shape, dtype=np.float32))
        interpreter.invoke()

    def run(array: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(input_index, array)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    return run

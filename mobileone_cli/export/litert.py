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

Quantized (`context.quantization`):
- "w8a8": litert-torch's own PT2E quantizer (`PT2EQuantizer` with
  `get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)`):
  int8 per-channel symmetric weights, static int8 per-tensor activations
  calibrated on every calibration image, then `litert_torch.convert(...,
  quant_config=QuantConfig(pt2e_quantizer=...))` of the converted module. The
  converter runs in strict QDQ mode (`_strict_qdq`): by default it re-quantizes
  the `keep_float` layers too and folds the first quantize and last dequantize
  into int8 input and output tensors; strict, the file is the converted module,
  float32 in and out. `write` returns the converted module with its biases
  rounded to the int32 grid (see `pt2e.round_biases`), the tight reference:
  measured on the digits, max relative error 0.018, top-1 agreement 1.0, and
  the same numbers as ExecuTorch's w8a8 file bit for bit.
- "fp16": fp16 weights, float32 biases and compute (litert-torch's
  `full_fp16_recipe`: ai-edge-quantizer's float casting with explicit
  DEQUANTIZE ops). The interpreter dequantizes once and computes in float32
  (XNNPACK and LiteRT's own kernels alike): against torch with fp16-rounded
  weights the file's relative error is 8.4e-7 on the digits, against fp32 8e-3.
  `write` returns that torch model (`fp16_reference`: biases are not rounded).
  ai-edge-quantizer stores the weights after the flatbuffer (buffer offsets),
  which `with_metadata` inlines when it re-packs.
`--channels-last` applies to both. The file's precision is read from its
tensors; the pipeline's compression record, if embedded, is `Declared.compression`.

Reproducibility: litert-torch writes the same bytes for the same model
(checked in two processes with different PYTHONHASHSEED, int8 and fp16 too),
and the re-pack is deterministic. Conversion is slow (S0 / S4 at 224 px: 16 / 26 s on 2 busy
cores) and prints progress to stdout unless told not to
(LITERT_TORCH_SHOW_PROGRESS, set to "n" while `write` runs).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import BadArtifactError, UsageError
from mobileone_cli.export import pt2e
from mobileone_cli.export.backend import (
    Candidate,
    WriteContext,
    check_fits,
    in_chunks,
    read_compression,
)
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
MODES = ("w8a8", "fp16")
"""`--quantize` modes this target writes (`compress.TARGET_MODES["tflite"]`)."""
_PRECISIONS = {"float32": "fp32", "float16": "fp16", "int8": "int8", "uint8": "uint8"}


def missing() -> str | None:
    """None when litert-torch and ai-edge-litert are installed; else the pip command."""
    return missing_modules(_MODULES, target=name, install=pip_extra(extra))


def companions(path: Path) -> tuple[Path, ...]:
    """Nothing ships beside this target's file."""
    return ()


def write(model: torch.nn.Module, path: Path, *, context: WriteContext
          ) -> torch.nn.Module | None:
    """Convert the folded model with litert-torch and write the `.tflite` at `path`.

    With `context.quantization`: mode "w8a8" quantizes with litert-torch's
    PT2E quantizer and returns the PT2E-converted module (the tight
    reference); mode "fp16" stores fp16 weights and returns `fp16_reference`
    of the model (see the module docstring). The float model returns None.
    """
    import torch

    options = context.options if context.options is not None else LiteRTOptions()
    if not isinstance(options, LiteRTOptions):
        raise UsageError(f"the tflite target takes LiteRTOptions, not {type(options).__name__}")
    quantization = context.quantization
    if quantization is not None:
        pt2e.check_request(quantization, target=name, modes=MODES)
        if quantization.mode == "fp16" and quantization.keep_float:
            raise UsageError("--keep-float applies to the w8a8 mode of --to tflite",
                             hint="fp16 weights cost little; drop --keep-float")
    layout = "NHWC" if options.channels_last else "NCHW"
    size = context.input_size
    example = torch.zeros((1, size, size, 3) if options.channels_last else (1, 3, size, size))
    reference: torch.nn.Module | None = None
    with _no_progress(), converting("litert-torch's conversion",
                                    hint="report it with the model's variant and the "
                                         "litert-torch version"):
        import litert_torch

        converted_model = model.eval()
        quant_config = None
        if quantization is not None and quantization.mode == "w8a8":
            from litert_torch.quantize.quant_config import QuantConfig

            quantizer = _int8_quantizer(quantization.keep_float)
            converted_model = pt2e_module(model, context, quantizer=quantizer)
            reference = pt2e.float32_only(pt2e.round_biases(copy.deepcopy(converted_model)))
            quant_config = QuantConfig(pt2e_quantizer=quantizer)
        elif quantization is not None:  # fp16
            from litert_torch.generative.quantize.quant_recipes import full_fp16_recipe

            quant_config = full_fp16_recipe()
            reference = fp16_reference(model)
        body = (litert_torch.to_channel_last_io(converted_model, args=[0])
                if options.channels_last else converted_model)
        named = _named(body, input_name=context.input_name, output_name=context.output_name)
        with _strict_qdq(quantization is not None and quantization.mode == "w8a8"):
            converted = litert_torch.convert(named, sample_kwargs={context.input_name: example},
                                             quant_config=quant_config)
        converted.export(str(path))
    entries = {METADATA_NAME: embedded_metadata(context, layout=layout).encode()}
    if context.labels:
        entries[LABELS_NAME] = "".join(f"{label}\n" for label in context.labels).encode()
    path.write_bytes(with_metadata(path.read_bytes(), entries))
    return reference


def pt2e_module(model: torch.nn.Module, context: WriteContext, *, quantizer: Any = None
                ) -> torch.nn.Module:
    """The PT2E-converted model `write` converts for `context.quantization` (mode "w8a8"):
    litert-torch's quantizer (`_int8_quantizer`, or `quantizer`), calibrated on
    `context.quantization.calibration`. Its weights stay float behind
    quantize/dequantize pairs, which litert-torch's converter folds into int8
    tensors; its biases are float (`write` returns them rounded)."""
    quantization = context.quantization
    if quantization is None or quantization.mode != "w8a8":
        raise UsageError("pt2e_module needs context.quantization of mode int8",
                         hint="pass WriteContext(quantization=Quantization('w8a8', ...))")
    pt2e.check_request(quantization, target=name, modes=MODES)
    assert quantization.calibration is not None  # check_request
    return pt2e.converted_module(
        model, quantizer if quantizer is not None else _int8_quantizer(quantization.keep_float),
        quantization.calibration, input_size=context.input_size, fold_quantize=False)


def fp16_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The tight reference of an fp16 file: a float32 copy of `model` with its conv and linear
    weights rounded to fp16 and back, biases kept float32 (as the file stores them).

    Not `proof.compare.with_rounded_weights`, which rounds the biases too: against
    that the digits file is 1.3e-3 off, against this 8.4e-7 (float32 noise).
    """
    import torch

    rounded = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return rounded


def _int8_quantizer(keep_float: Sequence[str]) -> Any:
    """litert-torch's PT2E quantizer: int8 per-channel symmetric weights, static int8
    per-tensor activations (histogram-calibrated), nothing annotated in `keep_float`'s layers.

    litert-torch's own `set_module_name` refuses a None config and matches names
    mangled (`reparam_conv` becomes `reparam.conv`), so the layers kept float
    are left out with torchao's module-name filter instead.
    """
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
        propagate_annotation,
    )
    quantized = pt2e.outside(keep_float)

    class Quantizer(PT2EQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            self._annotate_all_static_patterns(model, self.global_config, quantized)
            propagate_annotation(model)
            return model

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    return Quantizer().set_global(config)


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
def _strict_qdq(strict: bool) -> Iterator[None]:
    """Make litert-torch's converter take the PT2E graph's quantize/dequantize pairs as they are.

    Its default ("non-strict" QDQ conversion) re-quantizes every conv that sits
    between quantized tensors, `keep_float` layers included, and folds the
    graph's first quantize and last dequantize into int8 input and output
    tensors. Strict, the file is the converted module: float32 in and out (as
    ExecuTorch's), int8 where PT2E put int8. litert-torch 0.10.0 builds its
    `ConvertToTFLConfig` inside `exported_programs_to_flatbuffer` and exposes
    no option for it, so the class is replaced for the call.
    """
    if not strict:
        yield
        return
    from litert_torch._convert import litert_converter

    extension = litert_converter.converter_api_ext
    original = extension.ConvertToTFLConfig

    def strict_config() -> Any:
        config = original()
        config.strict_qdq_mode = True
        return config

    extension.ConvertToTFLConfig = strict_config
    try:
        yield
    finally:
        extension.ConvertToTFLConfig = original


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
    for buffer in model.buffers or []:
        # A buffer stored after the flatbuffer (offset > 1: ai-edge-quantizer writes fp16
        # weights so) would point past the end of the re-packed bytes: inline it.
        if buffer.offset > 1:
            buffer.data = flatbuffer[buffer.offset : buffer.offset + buffer.size]
            buffer.offset = buffer.size = 0
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

    # An int8 model has no float32 twin to run (its tight reference is the writer's); an fp16
    # one computes in float32 already (weights dequantized once; see the module docstring).
    quantized = declared.precision in ("int8", "uint8")
    return Candidate(declared=declared, run=run, run_full_precision=None if quantized else run,
                     as_torch=_float32_biases if declared.precision == "fp16" else None)


def _float32_biases(model: torch.nn.Module) -> torch.nn.Module:
    """The folded model as an fp16 file holds it: a copy whose conv and linear biases are
    non-persistent buffers, outside the state dict that the proof's fp16 rounding
    (`proof.compare.with_rounded_weights`) rounds; the file keeps them float32."""
    import torch

    held = copy.deepcopy(model)
    for module in held.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear) and module.bias is not None:
            bias = module.bias.detach()
            del module.bias
            module.register_buffer("bias", bias, persistent=False)
    return held


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
    compression = read_compression(document.get("metadata") or {})
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
        compression=compression,
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

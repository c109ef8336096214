"""The folded model as one self-contained, minimal, reproducible ONNX file.

Why the TorchScript exporter (`dynamo=False`): measured on a folded S0 with
torch 2.13, it writes the minimal graph (one Conv + Relu per block, ReduceMean,
Gemm) in 0.2 s; the dynamo exporter took 5.6 s, raised the opset to 18, split
the weights into a second `.onnx.data` file and needs `onnxscript`.

Why the IR version is set by hand: ONNX Runtime Mobile and older onnxruntime
releases refuse IR 11 and newer, while onnx 1.23 itself defaults to IR 14.
torch 2.13 and onnxsim 0.8.1 happen to write IR 8 for opset 17 today; the file
is stamped explicitly with the lowest IR version its opsets need (8 for opset
17), so an upgrade of either cannot silently make it unloadable on a phone.

Static or dynamic input size: a static export (the default, what mobile
execution providers such as NNAPI and Core ML want) takes only its own
1 x 3 x H x W, so `candidate` refuses any other size with a `ValueError`
naming the shape, and runs a larger batch one image at a time. Verify a
static export on the square batch of `verify.default_inputs` only: the
non-square batch proves that the torch model and dynamic-size exports hold
no baked-in size, which a static file holds by definition.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli import __version__
from mobileone_cli.compress import DEFAULT_CALIBRATION_METHOD, compress_onnx
from mobileone_cli.errors import BadArtifactError, ExportFailedError
from mobileone_cli.export.backend import (
    Candidate,
    WriteContext,
    check_fits,
    first_line,
    in_chunks,
    read_compression,
)
from mobileone_cli.options import OnnxOptions
from mobileone_cli.quiet import captured
from mobileone_cli.results import Declared
from mobileone_cli.validation import check_onnx_file

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

name = "onnx"
suffix = ".onnx"
extra = None
INPUT_NAME = "image"
PRODUCER_NAME = "mobileone"
BATCH_AXIS = "batch"
HEIGHT_AXIS = "height"
WIDTH_AXIS = "width"
FEATURE_HEIGHT_AXIS = "feature_height"
FEATURE_WIDTH_AXIS = "feature_width"
# torch.onnx's TorchScript exporter is deprecated in favour of dynamo (see the module
# docstring): torch 2.13 warns about it once from the caller's line, and again from its
# own internals ("The feature will be removed...", torch/onnx/_internal/.../utils.py).
_LEGACY_EXPORTER_WARNING = r".*legacy TorchScript-based ONNX export"
_TORCH_ONNX_MODULES = r"torch\.onnx\."


def missing() -> str | None:
    """onnx, onnxsim and onnxruntime are dependencies of the tool itself."""
    return None


def companions(path: Path) -> tuple[Path, ...]:
    """Nothing ships beside this target's file."""
    return ()


def write(model: torch.nn.Module, path: Path, *, context: WriteContext) -> None:
    """The folded model as one self-contained ONNX file at `path` (see `export`).

    With `context.quantization`, the float export is compressed (`compress.compress_onnx`)
    and the result stamped with the same metadata and serialised deterministically.
    """
    options = context.options or OnnxOptions()
    quantization = context.quantization
    if quantization is None:
        if context.shared is None:
            export(model, path, metadata=dict(context.metadata), options=options,
                   input_size=context.input_size, output_name=context.output_name)
        else:
            path.write_bytes(exported_bytes(model, context=context, options=options))
        return
    import onnx

    with tempfile.TemporaryDirectory(prefix="mobileone-onnx-") as folder:
        float_path = Path(folder) / "float.onnx"
        export(model, float_path, metadata={}, options=options,
               input_size=context.input_size, output_name=context.output_name)
        compress_onnx(float_path, path, mode=quantization.mode,
                      calibration=quantization.calibration,
                      method=quantization.calibration_method or DEFAULT_CALIBRATION_METHOD,
                      keep_float=quantization.keep_float)
    proto = onnx.load(str(path))
    _stamp(proto, metadata=dict(context.metadata))
    path.write_bytes(proto.SerializeToString(deterministic=True))


def exported_bytes(model: torch.nn.Module, *, context: WriteContext,
                   options: OnnxOptions) -> bytes:
    """The bytes `export` writes for `model` with the context's metadata and `options`.

    Made once per run: with `context.shared`, the ONNX and ORT targets of one run
    share a single trace and simplification.
    """
    def make() -> bytes:
        with tempfile.TemporaryDirectory(prefix="mobileone-onnx-") as folder:
            path = Path(folder) / "model.onnx"
            export(model, path, metadata=dict(context.metadata), options=options,
                   input_size=context.input_size, output_name=context.output_name)
            return path.read_bytes()

    if context.shared is None:
        return make()
    key = ("onnx", model, options, context.input_size, context.output_name,
           tuple(sorted(context.metadata.items())))
    return context.shared.bytes_of(key, make)


def export(
    model: torch.nn.Module,
    path: Path,
    *,
    metadata: dict[str, str],
    options: OnnxOptions,
    input_size: int,
    output_name: str = "logits",
) -> None:
    """Write the folded model as one self-contained ONNX file at `path`.

    The caller passes a temporary path and moves it into place after
    verification. The same model, metadata and options always give the same
    bytes: nothing time- or host-dependent is written.
    """
    import onnx

    _trace(model, path, options=options, input_size=input_size, output_name=output_name)
    proto = onnx.load(str(path))
    if options.simplify:
        proto = _simplify(proto)
    _stamp(proto, metadata=metadata)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        message = f"the exported ONNX model is invalid: {first_line(error)}"
        raise ExportFailedError(message) from None
    # Deterministic serialisation: no map fields depend on insertion or hash order.
    path.write_bytes(proto.SerializeToString(deterministic=True))


def _trace(model: torch.nn.Module, path: Path, *, options: OnnxOptions, input_size: int,
           output_name: str) -> None:
    """torch.onnx's file at `path`; `export` reads it back and rewrites it in place."""
    import torch

    example = torch.zeros(1, 3, input_size, input_size)
    input_axes: dict[int, str] = {}
    output_axes: dict[int, str] = {}
    if options.dynamic_batch:
        input_axes[0] = output_axes[0] = BATCH_AXIS
    if options.dynamic_size:
        input_axes.update({2: HEIGHT_AXIS, 3: WIDTH_AXIS})
        with torch.inference_mode():
            spatial_output = model(example).dim() == 4
        if spatial_output:  # a headless feature map: name its axes, not torch's "Relu..._dim_2"
            output_axes.update({2: FEATURE_HEIGHT_AXIS, 3: FEATURE_WIDTH_AXIS})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEGACY_EXPORTER_WARNING,
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", module=_TORCH_ONNX_MODULES, category=DeprecationWarning)
        # torch.onnx prints its whole IR graph from C++ when it fails: keep it off our output.
        with captured() as output:
            try:
                torch.onnx.export(
                    model,
                    (example,),
                    path,
                    input_names=[INPUT_NAME],
                    output_names=[output_name],
                    dynamic_axes=({INPUT_NAME: input_axes, output_name: output_axes}
                                  if input_axes else None),
                    opset_version=options.opset,
                    do_constant_folding=True,
                    training=torch.onnx.TrainingMode.EVAL,
                    dynamo=False,
                )
            except Exception as error:  # torch.onnx raises RuntimeError, ValueError, TypeError...
                raise ExportFailedError(
                    f"torch.onnx could not export the model: {output.last_line(error)}",
                    hint=_opset_hint(options.opset),
                ) from error


def _opset_hint(opset: int) -> str:
    """Which opsets this torch's TorchScript exporter writes, when torch says (a private name)."""
    import torch.onnx

    constants = getattr(torch.onnx, "_constants", None)
    highest = getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)
    if isinstance(highest, int) and opset > highest:
        return (f"torch {torch.__version__} exports opsets up to {highest}; "
                f"pass --opset {highest} or lower")
    return "run with --debug for the converter's whole output; the default --opset 17 is tested"


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    # check_n=0: onnxsim only runs the checker; the numerical proof is the
    # caller's `verify.compare` against the train-time model, at a tighter tolerance.
    simplified, check_ok = onnxsim.simplify(proto)
    if not check_ok:
        raise ExportFailedError("onnxsim could not validate the simplified ONNX model",
                                hint="export without simplification (OnnxOptions(simplify=False))")
    return simplified


def _stamp(proto: onnx.ModelProto, *, metadata: dict[str, str]) -> None:
    """Set what the file says about itself, replacing torch's and onnxsim's values."""
    import onnx

    proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    proto.producer_name = PRODUCER_NAME
    proto.producer_version = __version__
    # Cleared, not set to "": an empty string is still a field on the wire.
    proto.ClearField("doc_string")
    for node in proto.graph.node:
        node.ClearField("doc_string")
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)


def open(path: Path) -> Candidate:
    """An onnxruntime CPU session as a candidate: float32 NCHW in, first output out.

    A model with a fixed batch of 1 runs a larger batch one sample at a time.
    An array whose channels, height or width do not fit the model's static
    shape raises a `ValueError` naming the shape the model takes.
    """
    import onnx
    import onnxruntime

    check_onnx_file(path)  # garbage, or external data outside its folder, in one line
    try:
        proto = onnx.load(str(path), load_external_data=False)
        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 3  # errors only: no "unused initializer" chatter
        # Idle threads sleep instead of spinning: verification shares the CPU with torch's.
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(path), sess_options=session_options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # noqa: BLE001 - onnx and onnxruntime raise unrelated types
        raise BadArtifactError(f"{path} is not a readable ONNX model: {first_line(error)}",
                               hint="pass an .onnx file written by `mobileone export`") from None
    model_input = session.get_inputs()[0]
    expected = tuple(size if isinstance(size, int) else (size or None)
                     for size in model_input.shape)

    def run(array: np.ndarray) -> np.ndarray:
        check_fits(array, expected, name=path.name)
        batch = expected[0] if isinstance(expected[0], int) else None
        return in_chunks(lambda chunk: session.run(None, {model_input.name: chunk})[0],
                         array, batch=batch)

    compression = read_compression({entry.key: entry.value for entry in proto.metadata_props})
    declared = Declared(
        runtime=f"onnxruntime {onnxruntime.__version__}",
        input_name=model_input.name,
        input_shape=tuple(size if isinstance(size, int) else str(size) for size in expected),
        output_names=tuple(output.name for output in session.get_outputs()),
        details={"opset": max((entry.version for entry in proto.opset_import
                               if entry.domain in ("", "ai.onnx")), default=0),
                 "ir_version": proto.ir_version,
                 "producer": f"{proto.producer_name} {proto.producer_version}".strip()},
        precision=_precision(proto) if compression else "fp32",
        compression=compression,
    )
    if compression is None:
        return Candidate(declared=declared, run=run, run_full_precision=run)
    full_precision = _float_session(proto, session_options)

    def run_full_precision(array: np.ndarray) -> np.ndarray:
        check_fits(array, expected, name=path.name)
        batch = expected[0] if isinstance(expected[0], int) else None
        return in_chunks(lambda chunk: full_precision.run(None, {model_input.name: chunk})[0],
                         array, batch=batch)

    return Candidate(declared=declared, run=run, run_full_precision=run_full_precision,
                     stored_weights=lambda: stored_weights(proto))


def _precision(proto: onnx.ModelProto) -> str:
    """"int8" when weights are stored as int8 (DequantizeLinear), "fp16" when as fp16."""
    from onnx import TensorProto

    types = {initializer.data_type for initializer in proto.graph.initializer}
    if TensorProto.INT8 in types or TensorProto.UINT8 in types:
        return "int8"
    return "fp16" if TensorProto.FLOAT16 in types else "fp32"


def _weight_sources(proto: onnx.ModelProto) -> dict[str, str]:
    """Folded layer name -> the tensor a Conv/Gemm reads as its weight, traced back through
    DequantizeLinear and Cast to the stored initializer (`<layer>.weight...`)."""
    producers = {output: node for node in proto.graph.node for output in node.output}
    layers = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        while name in producers and producers[name].op_type in ("DequantizeLinear", "Cast"):
            name = producers[name].input[0]
        layer, found, _ = name.partition(".weight")
        if found:
            layers[layer] = node.input[1]
    return layers


def stored_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Parameter name (`stage1.0.reparam_conv.weight`, `....bias`) -> its value as the model
    computes with it (float32).

    An int8 weight is dequantized exactly as DequantizeLinear does it ((q - zero_point) *
    scale along its axis, in float32); an fp16 weight is widened.
    """
    import numpy as np
    from onnx import numpy_helper

    initializers = {item.name: item for item in proto.graph.initializer}
    producers = {output: node for node in proto.graph.node for output in node.output}

    def value(name: str) -> np.ndarray:
        if name in initializers:
            return numpy_helper.to_array(initializers[name]).astype(np.float32)
        node = producers[name]
        if node.op_type == "Cast":
            return value(node.input[0])
        quantized = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * quantized.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((quantized - zero) * scale).astype(np.float32)

    tensors = {}
    for layer, weight in _weight_sources(proto).items():
        tensors[f"{layer}.weight"] = value(weight)
        bias = f"{layer}.bias"
        if bias in initializers or (bias in producers
                                    and producers[bias].op_type in ("DequantizeLinear", "Cast")):
            tensors[bias] = value(bias)
    return tensors


def _float_session(proto: onnx.ModelProto, session_options: Any) -> Any:
    """The same stored weights with float32 arithmetic and float activations.

    fp16: every fp16 initializer widened (exactly) and every cast to fp16 made a cast to
    fp32. int8: each QuantizeLinear -> DequantizeLinear pair on an activation removed (its
    consumers read the float tensor); the weights' DequantizeLinear stay. What is left is
    the stored weights in a float32 graph, whose torch twin is the conversion proof.
    """
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    model = copy.deepcopy(proto)
    graph = model.graph
    initializers = {item.name for item in graph.initializer}
    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == TensorProto.FLOAT16:
            widened = numpy_helper.from_array(
                numpy_helper.to_array(initializer).astype(np.float32), initializer.name)
            graph.initializer[index].CopyFrom(widened)
    for node in graph.node:
        if node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                    attribute.i = TensorProto.FLOAT
    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = list(graph.node)
    producers = {output: index for index, node in enumerate(nodes) for output in node.output}
    bypass: dict[str, str] = {}
    relus: list[onnx.NodeProto] = []
    removed: set[int] = set()  # indices: protobuf wrappers are not stable objects to id()
    for index, node in enumerate(nodes):
        if node.op_type != "DequantizeLinear" or node.input[0] in initializers:
            continue
        source = producers.get(node.input[0])
        if source is not None and nodes[source].op_type == "QuantizeLinear":
            quantize = nodes[source]
            removed.update({index, source})
            if _clips_at_zero(quantize, graph.initializer):
                # The quantizer dropped the ReLU this range stood for: put it back.
                relus.append(helper.make_node("Relu", [quantize.input[0]], [node.output[0]]))
            else:
                bypass[node.output[0]] = quantize.input[0]
    kept = [node for index, node in enumerate(nodes) if index not in removed] + relus
    for node in kept:
        for position, name in enumerate(node.input):
            while name in bypass:  # a requantized tensor: follow the chain back to float
                name = bypass[name]
            node.input[position] = name
    # A quantized graph output (the logits) keeps its name through an Identity.
    for output in graph.output:
        name = output.name
        while name in bypass:
            name = bypass[name]
        if name != output.name:
            kept.append(helper.make_node("Identity", [name], [output.name]))
    del graph.node[:]
    graph.node.extend(kept)
    model.graph.ClearField("value_info")  # shapes of removed tensors; onnxruntime infers them
    _sort_topologically(model.graph)
    return onnxruntime.InferenceSession(model.SerializeToString(), sess_options=session_options,
                                        providers=["CPUExecutionProvider"])


def _clips_at_zero(quantize: onnx.NodeProto, initializers: Any) -> bool:
    """Whether a QuantizeLinear's range starts at 0 (zero point at the type's minimum): how
    onnxruntime's quantizer represents a ReLU it removed."""
    from onnx import TensorProto, numpy_helper

    if len(quantize.input) < 3:
        return False
    zero_point = next((item for item in initializers if item.name == quantize.input[2]), None)
    if zero_point is None:
        return False
    lowest = {TensorProto.INT8: -128, TensorProto.UINT8: 0}.get(zero_point.data_type)
    return lowest is not None and bool((numpy_helper.to_array(zero_point) == lowest).all())


def _sort_topologically(graph: Any) -> None:
    """Reorder the graph's nodes so each comes after the producers of its inputs."""
    available = {item.name for item in graph.initializer} | {item.name for item in graph.input}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [node for node in pending if all(not name or name in available
                                                  for name in node.input)]
        if not ready:
            raise ExportFailedError("the float twin of the quantized graph has a cycle")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [node for node in pending if node not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def op_counts(path: Path) -> dict[str, int]:
    """Op type -> count over the graph, for the minimal-graph checks and the report."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))

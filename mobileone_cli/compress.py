"""Compressing exported models: int8 weights and activations, palettes, fp16, per target.

A compression step takes a written fp32 (or fp16) artifact and writes its
compressed twin; the pipeline then proves and gates the twin like any artifact.
Everything here is pure: no printing, heavy imports inside the functions.

Modes are named as the field names them (`w8`, `pal4`, `w8a8`, `fp16` ...).
`TARGET_MODES` says which target does which, as data, so the CLI can refuse a
combination before any work (`mode_info`). Modes that quantize activations
need calibration images (`require_calibration`): random noise is not
calibration, and ranges measured on it would clip real images.

Core ML off a Mac. `coremltools.optimize.coreml.linear_quantize_weights` and
`palettize_weights` run anywhere. `experimental.linear_quantize_activations`
does not: it calibrates by running the model with Core ML, which exists only
on Apple platforms. `compress_coreml` measures the activation ranges with the
numpy evaluator (`mil.trace_program`) instead, on the very program it
quantizes, then applies the same two graph passes coremltools applies
(`insert_prefix/suffix_quantize_dequantize_pair`, then
`dequantize_quantize_pair_elimination`). Two differences from coremltools
9.0, both on purpose: the range of a tensor is its min and max over *all*
calibration images (coremltools' `_update_tensor_range` overwrites the range
with each new sample, so only the last image counts), and the passes are
reached through coremltools' private `PASS_REGISTRY` (pinned by
`coremltools>=9,<10`).

The tight reference of each mode (what the artifact must reproduce almost
bit for bit, whatever the mode costs) is in `ModeInfo.tight_reference`;
`fake_quantize_state` builds it in torch for the int8 per-channel modes.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.defaults import CALIBRATION_METHODS, DEFAULT_CALIBRATION_METHOD
from mobileone_cli.errors import ExportFailedError, UsageError
from mobileone_cli.mil import quiet_coremltools, summarize_program, trace_program
from mobileone_cli.results import LayerSensitivity

if TYPE_CHECKING:
    import numpy as np
    import torch

# --- Which target does which mode (data; no imports) --------------------------------------

TARGET_MODES: dict[str, tuple[str, ...]] = {
    "coreml": ("w8", "pal8", "pal6", "pal4", "w8a8"),
    "onnx": ("w8a8", "w8", "fp16"),
    # Implemented by the ExecuTorch and LiteRT backends (the Android targets issue).
    "executorch": ("w8a8",),
    "tflite": ("w8a8", "fp16"),
}
# Histogram bins of the Entropy (KL) calibrator: the search tries thresholds from 128 bins up.
ENTROPY_BINS = 2048
# Palettes are per grouped channel: each group of 16 output channels shares one table
# (coremltools' recommendation for iOS 18; a per-tensor palette is the broken baseline).
PALETTE_GROUP_SIZE = 16
# Smaller kernels stay fp16 in the palettized modes (coremltools' own default threshold): a
# depthwise 3x3 kernel of 16 channels holds 144 weights, fewer than one 256-entry palette, so
# palettizing it makes the package larger (measured on S0: pal8 3.47 MB with every layer
# palettized, against 2.19 MB for w8).
PALETTE_MIN_WEIGHTS = 2048


@dataclass(frozen=True)
class ModeInfo:
    """What one compression mode of one target does, and what proves it."""

    target: str
    mode: str
    weights: str
    """How weights are stored, e.g. "int8 per output channel, symmetric"."""
    activations: str
    """"float" (the artifact's compute precision) or how they are quantized."""
    quantizes_activations: bool
    """Needs calibration images."""
    minimum_deployment_target: str | None
    """Core ML: the oldest target that runs the compressed ops; None elsewhere."""
    tight_reference: str
    """The model the artifact must match almost exactly (the conversion proof)."""


_INT8_WEIGHTS = "int8 per output channel, symmetric"
_FAKE_QUANT_REFERENCE = (
    "the folded torch model with fake_quantize_state(scheme='int8_per_channel') weights, "
    "evaluated in the artifact's compute precision"
)
_DECOMPRESSED_REFERENCE = (
    "the folded torch model with the artifact's decompressed weights "
    "(decompressed_weights(package)), evaluated in the artifact's compute precision; "
    "palette_error() bounds how far those weights are from the folded ones"
)

_PT2E_REFERENCE = (
    "the PT2E-converted torch module the backend's write returns, biases rounded to the "
    "int32 grid the int8 kernels store (measured on the digits: max relative error 0.018, "
    "top-1 agreement 1.0)"
)

MODE_INFO: dict[tuple[str, str], ModeInfo] = {
    ("coreml", "w8"): ModeInfo(
        "coreml", "w8", _INT8_WEIGHTS, "float", False, "iOS16", _FAKE_QUANT_REFERENCE),
    **{
        ("coreml", f"pal{bits}"): ModeInfo(
            "coreml", f"pal{bits}",
            f"{2**bits}-entry k-means palette per group of {PALETTE_GROUP_SIZE} output channels",
            "float", False, "iOS18", _DECOMPRESSED_REFERENCE)
        for bits in (8, 6, 4)
    },
    ("coreml", "w8a8"): ModeInfo(
        "coreml", "w8a8", _INT8_WEIGHTS,
        "int8 per tensor, symmetric, ranges from calibration (quantize/dequantize pairs)",
        True, "iOS17",
        "none in torch: the quantize/dequantize positions are chosen by coremltools' passes; "
        "the conversion proof is the weights' (fake_quantize_state) and the cost gate decides"),
    ("onnx", "w8a8"): ModeInfo(
        "onnx", "w8a8", _INT8_WEIGHTS,
        "int8 per tensor (QDQ), ranges from calibration (MinMax, Entropy or Percentile)",
        True, None,
        "none in torch: onnxruntime fuses QDQ into int8 kernels; the cost gate decides"),
    ("onnx", "w8"): ModeInfo(
        "onnx", "w8", _INT8_WEIGHTS + " (DequantizeLinear of int8 initializers)",
        "float", False, None, _FAKE_QUANT_REFERENCE.replace(" in the artifact's compute "
                                                            "precision", " in fp32")),
    ("onnx", "fp16"): ModeInfo(
        "onnx", "fp16", "fp16", "fp16 (inputs and outputs stay fp32)", False, None,
        "the folded torch model in fp16 (weights and activations)"),
    ("executorch", "w8a8"): ModeInfo(
        "executorch", "w8a8", _INT8_WEIGHTS + " (XNNPACKQuantizer)",
        "int8 per tensor, affine, histogram-calibrated (XNNPACKQuantizer, PT2E); "
        "float32 input and output", True, None, _PT2E_REFERENCE),
    ("tflite", "w8a8"): ModeInfo(
        "tflite", "w8a8", _INT8_WEIGHTS + " (litert-torch's PT2EQuantizer)",
        "int8 per tensor, affine, histogram-calibrated (PT2E, strict QDQ conversion); "
        "float32 input and output", True, None, _PT2E_REFERENCE),
    ("tflite", "fp16"): ModeInfo(
        "tflite", "fp16", "fp16 (biases stay float32)",
        "float32 (the interpreter dequantizes the weights once)", False, None,
        "the folded torch model in float32 with fp16-rounded weights, biases float32 "
        "(litert.fp16_reference, which write returns; measured 8.4e-7 on the digits)"),
}


def mode_info(target: str, mode: str) -> ModeInfo:
    """The mode's facts; a `UsageError` (one line) for a mode the target does not do."""
    if target not in TARGET_MODES:
        raise UsageError(f"no compression for target '{target}'",
                         hint=f"targets that compress: {', '.join(TARGET_MODES)}")
    if mode not in TARGET_MODES[target]:
        doers = [name for name, modes in TARGET_MODES.items() if mode in modes]
        elsewhere = f" ('{mode}' is a mode of {', '.join(doers)})" if doers else ""
        raise UsageError(
            f"--quantize {mode} is not a mode of --to {target}{elsewhere}",
            hint=f"modes of {target}: {', '.join(TARGET_MODES[target])}",
        )
    return MODE_INFO[(target, mode)]


# The modes whose files cannot keep layers float: (why, what to do instead).
KEEP_FLOAT_REFUSED: dict[tuple[str, str], tuple[str, str]] = {
    # Measured on the digits with 4 layers kept float: top-1 agreement 0.981 with
    # onnxruntime's graph optimizations off, 0.128 (chance) with the defaults, because its
    # level-1 WeightBiasQuantization transformer re-quantizes the float weights and bias of
    # a Conv that reads a DequantizeLinear output (seen in the optimized graph: new
    # `Conv_weight_q` and `Conv_bias_int32` initializers). Apps run the defaults.
    ("onnx", "w8a8"): ("onnxruntime re-quantizes the kept layers when it optimizes the graph",
                       "use --quantize w8 --keep-float (int8 weights, float activations)"),
    ("tflite", "fp16"): ("LiteRT fp16 stores every weight in fp16",
                         "fp16 weights cost little; drop --keep-float"),
}


def refuse_keep_float(target: str, mode: str) -> None:
    """A one-line `UsageError` when `--keep-float` is asked of a mode that cannot keep layers."""
    if (target, mode) in KEEP_FLOAT_REFUSED:
        why, instead = KEEP_FLOAT_REFUSED[(target, mode)]
        raise UsageError(f"--keep-float cannot be combined with --quantize {mode} --to {target}: "
                         f"{why}", hint=instead)


def require_calibration(info: ModeInfo, calibration_count: int | None) -> None:
    """Refuse an activation-quantizing mode without calibration images, before any work."""
    if info.quantizes_activations and not calibration_count:
        raise UsageError(
            f"--quantize {info.mode} quantizes activations and needs calibration images",
            hint="pass --calibration DIR (a folder of images like the ones the model will see); "
            "random noise is not calibration",
        )


def check_calibration_method(method: str) -> str:
    """The lower-case method name, or a `UsageError`."""
    if method.lower() not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method '{method}'",
                         hint=f"use one of {', '.join(CALIBRATION_METHODS)}")
    return method.lower()


@dataclass(frozen=True)
class CompressionResult:
    """What a compression step did, for the manifest."""

    target: str
    mode: str
    compressed_layers: tuple[str, ...]
    """Folded layer names (`stage1.0.reparam_conv`, `linear` ...) stored compressed; the
    others stay float (kept, or too small to gain from a palette: `PALETTE_MIN_WEIGHTS`)."""
    kept_float: tuple[str, ...]
    """Layers the user asked to keep in float."""
    calibration_method: str | None
    calibration_count: int


# --- Layer names ------------------------------------------------------------------------


def check_keep_float(keep_float: Sequence[str], layers: Sequence[str]) -> tuple[str, ...]:
    """`keep_float` as given, refused in one line when a name is not a layer of the model."""
    unknown = [name for name in keep_float if name not in layers]
    if unknown:
        raise UsageError(
            f"--keep-float names no layer of this model: {', '.join(unknown)}",
            hint="layer names are as in `mobileone report --sensitivity`, "
            "e.g. stage0.reparam_conv, stage4.0.reparam_conv, linear",
        )
    return tuple(keep_float)


def weight_layers(state: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of the folded model's weighted layers (convs and the classifier), in order."""
    return tuple(key.removesuffix(".weight") for key in state if key.endswith(".weight"))


# --- Core ML ----------------------------------------------------------------------------


def compress_coreml(
    package: Path,
    destination: Path,
    *,
    mode: str,
    calibration: np.ndarray | None = None,
    keep_float: Sequence[str] = (),
) -> CompressionResult:
    """Write the `.mlpackage` at `package` compressed as `mode` to `destination`.

    `calibration` (w8a8 only): N x 3 x H x W in the program's own input form
    (normalised tensors, or 0-255 pixels for an image input), one image at a
    time through the numpy evaluator. `keep_float`: folded layer names
    (`stage1.0.reparam_conv`) whose weights stay float; unknown names are a
    `UsageError`. The package must have been converted for at least
    `mode_info("coreml", mode).minimum_deployment_target`.
    """
    info = mode_info("coreml", mode)
    require_calibration(info, 0 if calibration is None else len(calibration))
    import coremltools as ct
    import coremltools.optimize.coreml as optimize

    model = ct.models.MLModel(str(package), skip_model_load=True)
    weights = _coreml_weight_consts(package)
    keep = check_keep_float(keep_float, list(weights))
    if mode == "w8a8":
        try:
            model = _quantize_activations(model, package, calibration)
        except ValueError as error:  # e.g. an fp32 program: the passes write fp16 scales
            raise ExportFailedError(
                f"coremltools could not insert int8 activations: {_first_line(error)}",
                hint="Core ML w8a8 needs a package converted at --precision fp16 for iOS17+",
            ) from error
    if mode in ("w8", "w8a8"):
        op_config: Any = optimize.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
        )
    else:
        op_config = optimize.OpPalettizerConfig(
            nbits=int(mode.removeprefix("pal")), mode="kmeans",
            granularity="per_grouped_channel", group_size=PALETTE_GROUP_SIZE,
            weight_threshold=PALETTE_MIN_WEIGHTS,
        )
    config = optimize.OptimizationConfig(
        global_config=op_config,
        op_name_configs={const: None for layer in keep for const in weights[layer]},
    )
    try:
        with quiet_coremltools():
            compressed = (optimize.linear_quantize_weights(model, config)
                          if mode in ("w8", "w8a8") else optimize.palettize_weights(model, config))
            compressed.save(str(destination))
    except (ValueError, AssertionError, NotImplementedError) as error:
        raise ExportFailedError(
            f"coremltools could not compress {package.name} as {mode}: {_first_line(error)}",
            hint=f"convert for {info.minimum_deployment_target} or later",
        ) from error
    # A weight still held by a const op was left float (kept, or below the size threshold).
    still_float = _coreml_weight_consts(destination)
    compressed_layers = tuple(layer for layer in weights if layer not in still_float)
    if not compressed_layers:
        raise ExportFailedError(f"coremltools compressed no weight of {package} as {mode}")
    return CompressionResult(
        target="coreml", mode=mode,
        compressed_layers=compressed_layers,
        kept_float=keep, calibration_method="minmax" if calibration is not None else None,
        calibration_count=0 if calibration is None else len(calibration),
    )


def _coreml_weight_consts(package: Path) -> dict[str, tuple[str, ...]]:
    """Folded layer name -> the const ops holding its weight in the program.

    coremltools names a weight const after the torch parameter, dots made
    underscores (`stage1_0_reparam_conv_weight_to_fp16`); the layer name is
    recovered by matching the known folded names' underscored forms.
    """
    program = _read_consts(package)
    layers: dict[str, list[str]] = defaultdict(list)
    for name in program:
        stem, found, _ = name.partition("_weight")
        if found and stem:
            layers[stem].append(name)
    return {_dotted(stem): tuple(names) for stem, names in layers.items()}


def _dotted(stem: str) -> str:
    """`stage1_0_reparam_conv` -> `stage1.0.reparam_conv`, `stage2_3_se_reduce` -> `...se.reduce`."""
    parts = stem.split("_")
    words: list[str] = []
    for part in parts:
        # Underscores inside our own names: reparam_conv; everything else was a dot.
        if words and f"{words[-1]}_{part}" == "reparam_conv":
            words[-1] = "reparam_conv"
        else:
            words.append(part)
    return ".".join(words)


def _read_consts(package: Path) -> list[str]:
    from coremltools.proto import Model_pb2

    model_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    return [op.outputs[0].name for op in block.operations if op.type == "const"
            and op.outputs[0].type.tensorType.rank >= 2]


def activation_ranges(package: Path, calibration: np.ndarray) -> dict[str, dict[str, float]]:
    """Min and max of every float tensor of the program over all calibration images.

    Keyed by the program's tensor names, as coremltools' activation passes read
    them (`{name: {"rmin": ..., "rmax": ...}}`); outputs are left out, as
    coremltools leaves them out.
    """
    import numpy as np

    summary = summarize_program(package)
    input_name = summary.inputs[0][0]
    ranges: dict[str, dict[str, float]] = {}
    for image in calibration:
        values = trace_program(package, {input_name: image[None]})
        for name, value in values.items():
            if name in summary.outputs or not np.issubdtype(value.dtype, np.floating):
                continue
            low, high = float(value.min()), float(value.max())
            if name in ranges:
                low = min(low, ranges[name]["rmin"])
                high = max(high, ranges[name]["rmax"])
            ranges[name] = {"rmin": low, "rmax": high}
    return ranges


def _quantize_activations(model: Any, package: Path, calibration: np.ndarray | None) -> Any:
    """coremltools' linear_quantize_activations, calibrated by the numpy evaluator."""
    from coremltools import _SPECIFICATION_VERSION_IOS_17
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models import utils as model_utils
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

    assert calibration is not None  # require_calibration has checked
    ranges = activation_ranges(package, calibration)
    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric"))
    passes = []
    for name in ("insert_prefix_quantize_dequantize_pair",
                 "insert_suffix_quantize_dequantize_pair"):
        graph_pass = PASS_REGISTRY[f"compression::{name}"]
        graph_pass.set_options([PassOption("config", config)])
        graph_pass.set_options([PassOption("activation_stats", ranges)])
        passes.append(graph_pass)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    with quiet_coremltools():
        return model_utils._apply_graph_pass(
            model, passes, spec_version=_SPECIFICATION_VERSION_IOS_17,
            pymil_load_func=milproto_load.load, skip_model_load=True,
        )


def decompressed_weights(package: Path, *, sample: np.ndarray) -> dict[str, np.ndarray]:
    """Folded layer name -> its weight as the compressed program decompresses it (float32).

    Evaluates the program once on `sample` (any valid input) and reads the
    outputs of its `constexpr_*` ops, so the weights are exactly those the
    program computes with.
    """
    import numpy as np

    summary = summarize_program(package)
    values = trace_program(package, {summary.inputs[0][0]: sample})
    weights: dict[str, np.ndarray] = {}
    for name, value in values.items():
        stem, found, _ = name.partition("_weight")
        if found and stem and value.ndim >= 2:
            weights[_dotted(stem)] = np.asarray(value, dtype=np.float32)
    return weights


# --- ONNX -------------------------------------------------------------------------------


def compress_onnx(
    model_path: Path,
    destination: Path,
    *,
    mode: str,
    calibration: np.ndarray | None = None,
    method: str = DEFAULT_CALIBRATION_METHOD,
    keep_float: Sequence[str] = (),
) -> CompressionResult:
    """Write the ONNX model at `model_path` compressed as `mode` to `destination`.

    w8a8: static QDQ with onnxruntime.quantization.quantize_static, int8
    weights per output channel and int8 activations per tensor, ranges from
    `calibration` (normalised N x 3 x H x W) by `method` (minmax, entropy,
    percentile). w8: int8 weights per output channel stored as
    DequantizeLinear of int8 initializers, activations float (weight-only;
    onnxruntime's dynamic quantization was measured to collapse the digits
    model to chance, 0.128 top-1 agreement, see `_onnx_weight_only`). fp16:
    all weights and activations fp16, inputs and outputs kept fp32. `keep_float`: folded layer
    names whose nodes are left in float (w8 and fp16 only; see the check below).
    """
    info = mode_info("onnx", mode)
    require_calibration(info, 0 if calibration is None else len(calibration))
    if keep_float:
        refuse_keep_float("onnx", mode)
    import onnx

    model = onnx.load(str(model_path))
    nodes = _onnx_layer_nodes(model)
    keep = check_keep_float(keep_float, list(nodes))
    excluded = [nodes[layer] for layer in keep]
    if mode == "fp16":
        _onnx_fp16(model, destination, excluded)
        used_method = None
    elif mode == "w8":
        _onnx_weight_only(model, destination, nodes, keep)
        used_method = None
    else:
        assert calibration is not None
        used_method = check_calibration_method(method)
        _onnx_static(model_path, destination, calibration, used_method, excluded)
    return CompressionResult(
        target="onnx", mode=mode,
        compressed_layers=tuple(layer for layer in nodes if layer not in keep),
        kept_float=keep, calibration_method=used_method,
        calibration_count=0 if calibration is None else len(calibration),
    )


def _onnx_layer_nodes(model: Any) -> dict[str, str]:
    """Folded layer name -> the name of the Conv/Gemm node that reads `<layer>.weight`."""
    layers = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            weight = node.input[1]
            if weight.endswith(".weight"):
                layers[weight.removesuffix(".weight")] = node.name
    return layers


def _onnx_static(model_path: Path, destination: Path, calibration: np.ndarray, method: str,
                 excluded: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    input_name = _onnx_input_name(model_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._images = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._images, None)
            return None if image is None else {input_name: image[None]}

    with quiet_coremltools(), tempfile.TemporaryDirectory(prefix="mobileone-calibration-") as folder:
        cache = None
        if method == "entropy":
            # quantize_static builds its Entropy calibrator with 128 histogram bins and 128
            # quantized bins, so the KL search has one candidate, the full range: its ranges are
            # MinMax's (measured: all 43 activation scales of the digits model identical). The
            # ranges are computed here with a real search and handed over as a cache.
            calibrator = create_calibrator(
                model_path, augmented_model_path=str(Path(folder) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.Entropy,
                extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
            )
            calibrator.collect_data(Reader())
            cache = Path(folder) / "ranges.json"
            save_tensors_data(calibrator.compute_data(), cache)
        quantize_static(
            str(model_path), str(destination), Reader(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method], nodes_to_exclude=excluded,
            calibration_cache_path=None if cache is None else str(cache),
        )


def _onnx_weight_only(model: Any, destination: Path, layers: Mapping[str, str],
                      keep: Sequence[str]) -> None:
    """int8 weights per output channel as DequantizeLinear of int8 initializers; float activations.

    The same numbers as `fake_quantize_weight` in float32 (scale = 2 max|w| / 254
    per output channel, round half to even, zero point 0), so the torch model
    with `fake_quantize_state` weights is this file's tight reference.

    Not onnxruntime's `quantize_dynamic`: its ConvInteger path took the digits
    model to chance (top-1 agreement 0.128, accuracy 0.913 -> 0.102), with int8
    or uint8 weights, per channel or per tensor, depthwise layers excluded or
    not; with only the classifier quantized it was exact. Dynamic quantization of
    convolutions is known to collapse CNNs (pytorch#70480, ao#4292).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    initializers = {item.name: item for item in model.graph.initializer}
    dequantize_nodes = []
    for layer, node_name in layers.items():
        if layer in keep:
            continue
        node = next(item for item in model.graph.node if item.name == node_name)
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        flat = weight.reshape(len(weight), -1)
        maximum = np.abs(flat).max(axis=1)
        scale = ((maximum + maximum) / np.float32(2 * INT8_LIMIT)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        quantized = np.clip(np.round(flat / safe[:, None]), -INT8_LIMIT, INT8_LIMIT)
        names = [f"{layer}.weight_{part}" for part in ("quantized", "scale", "zero_point",
                                                        "dequantized")]
        model.graph.initializer.extend([
            numpy_helper.from_array(quantized.astype(np.int8).reshape(weight.shape), names[0]),
            numpy_helper.from_array(scale, names[1]),
            numpy_helper.from_array(np.zeros(len(scale), dtype=np.int8), names[2]),
        ])
        dequantize_nodes.append(helper.make_node(
            "DequantizeLinear", names[:3], [names[3]], name=f"{layer}.weight_dequantize", axis=0))
        model.graph.initializer.remove(initializers[node.input[1]])
        node.input[1] = names[3]
    # DequantizeLinear reads only initializers: first in the graph keeps it topologically sorted.
    nodes = [*dequantize_nodes, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    destination.write_bytes(model.SerializeToString(deterministic=True))


def _onnx_fp16(model: Any, destination: Path, excluded: list[str]) -> None:
    import onnx

    # onnxruntime ships onnxconverter-common's float16 converter: no extra dependency.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet_coremltools():
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=excluded)
    onnx.save(converted, str(destination))


def _onnx_input_name(model_path: Path) -> str:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {item.name for item in model.graph.initializer}
    return next(item.name for item in model.graph.input if item.name not in initializers)


# --- Torch references -------------------------------------------------------------------

INT8_LIMIT = 127


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """int8 per-output-channel symmetric quantization, back in float: the w8 reference.

    As coremltools computes it, in the weight's own dtype (fp16 for an fp16
    program): scale = 2 max|w| / 254 per output channel (axis 0), q =
    round(w / scale) (half to even) clipped to [-127, 127]; the dequantized
    weight q * scale is computed in float32 and rounded once to the dtype, as
    the program's `constexpr_*` op does. An all-zero channel stays zero.
    """
    import torch

    flat = weight.detach().reshape(len(weight), -1)
    maximum = flat.abs().amax(dim=1, keepdim=True)
    scale = (maximum + maximum) / (2 * INT8_LIMIT)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.clamp(torch.round(flat / safe), -INT8_LIMIT, INT8_LIMIT)
    dequantized = quantized.to(torch.float32) * scale.to(torch.float32)
    return dequantized.to(weight.dtype).reshape(weight.shape)


def fake_quantize_state(
    state: Mapping[str, torch.Tensor], *, scheme: str = "int8_per_channel",
    keep_float: Sequence[str] = (), layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The folded state with each layer's weight fake-quantized; biases stay float.

    `scheme`: "int8_per_channel" (the w8 reference) or "int8_per_tensor" (the
    broken baseline, one scale for the whole kernel). `layers` limits the
    quantization to those layers (sensitivity); `keep_float` excludes some.
    """
    chosen = set(weight_layers(state) if layers is None else layers) - set(keep_float)
    result = dict(state)
    for layer in chosen:
        weight = state[f"{layer}.weight"]
        if scheme == "int8_per_channel":
            result[f"{layer}.weight"] = fake_quantize_weight(weight)
        elif scheme == "int8_per_tensor":
            flat = weight.reshape(1, -1)
            result[f"{layer}.weight"] = fake_quantize_weight(flat).reshape(weight.shape)
        else:
            raise ValueError(f"unknown scheme {scheme}")
    return result


def palette_error(folded: Mapping[str, np.ndarray], decompressed: Mapping[str, np.ndarray],
                  *, bits: int) -> dict[str, float]:
    """Per layer: max |decompressed - folded| over the layer's weight range / 2^bits.

    A k-means palette of 2^bits entries puts every weight within about half a
    step of the range it spans, so a correct palette stays near or below 1; a
    corrupted palette or a swapped index table is far above.
    """
    import numpy as np

    errors = {}
    for layer, weight in decompressed.items():
        reference = np.asarray(folded[layer], dtype=np.float64)
        spread = float(reference.max() - reference.min()) or 1.0
        step = spread / (2**bits)
        errors[layer] = float(np.abs(np.asarray(weight, np.float64) - reference).max() / step)
    return errors


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


__all__ = [
    "CALIBRATION_METHODS",
    "MODE_INFO",
    "TARGET_MODES",
    "CompressionResult",
    "ModeInfo",
    "activation_ranges",
    "check_calibration_method",
    "check_keep_float",
    "compress_coreml",
    "compress_onnx",
    "decompressed_weights",
    "fake_quantize_state",
    "fake_quantize_weight",
    "mode_info",
    "palette_error",
    "refuse_keep_float",
    "require_calibration",
    "weight_layers",
]


# --- Sensitivity ------------------------------------------------------------------------


def kernel_outlier(weight: torch.Tensor) -> float:
    """max over output channels of max|w_c| / std(w_c) (0 for a constant channel)."""
    import torch

    flat = weight.detach().to(torch.float64).reshape(len(weight), -1)
    if flat.shape[1] < 2:
        return 0.0
    spread = flat.std(dim=1)
    ratio = flat.abs().amax(dim=1) / torch.where(spread > 0, spread, torch.inf)
    return float(ratio.max())


def sensitivity(
    model_factory: Any,
    state: Mapping[str, torch.Tensor],
    inputs: np.ndarray,
    *,
    scheme: str = "int8_per_channel",
) -> tuple[LayerSensitivity, ...]:
    """Every weighted layer of a folded model, worst first, by the error of quantizing it alone.

    `model_factory(state) -> torch.nn.Module` builds the folded model from a
    state dict (e.g. `lambda s: model.build_model(folded_spec, s)`); `inputs`
    are normalised N x 3 x H x W (calibration or held-out images). The
    quantization is `fake_quantize_state(scheme=...)` on one layer at a time.
    """
    import torch

    batch = torch.from_numpy(inputs)

    def outputs(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return model_factory(dict(weights))(batch).double()

    reference = outputs(state)
    energy = float((reference**2).sum()) or 1.0
    results = []
    for layer in weight_layers(state):
        quantized = outputs(fake_quantize_state(state, scheme=scheme, layers=[layer]))
        agreement = (float((quantized.argmax(dim=1) == reference.argmax(dim=1)).double().mean())
                     if reference.dim() == 2 else None)
        results.append(LayerSensitivity(
            layer=layer,
            relative_error=float(((quantized - reference) ** 2).sum()) / energy,
            top1_agreement=agreement,
            outlier=kernel_outlier(state[f"{layer}.weight"]),
        ))
    return tuple(sorted(results, key=lambda item: -item.relative_error))


def worst_layers(ranked: Sequence[LayerSensitivity], count: int) -> tuple[str, ...]:
    """The names of the `count` most sensitive layers (`--keep-float N`)."""
    if count < 0:
        raise UsageError(f"--keep-float takes a count of 0 or more, got {count}")
    return tuple(item.layer for item in ranked[:count])

"""`export --quantize`: the pipeline's compression step and the proof of a compressed artifact.

Before any work, `plan` checks the mode against every target (a target that cannot
do it is a usage error, or skipped in a bundle), the calibration images a mode
needs and Core ML's deployment target. After the fold, `prepare` loads the
calibration images, splits off held-out images when `--inputs` is not given,
resolves `--keep-float` (names, or the N layers `compress.sensitivity` ranks
worst) and gives each backend its `Quantization` and the record its file keeps.

A compressed artifact is proven twice (`prove_compressed`):
- The weight check: each stored weight against the folded one, in steps of
  the scheme (an int8 channel's scale, a palette's spread / 2^bits).
- The conversion proof: the artifact with float32 arithmetic and float
  activations (`Candidate.run_full_precision`) against the torch module holding
  the artifact's stored weights, under the fp32 noise-floor rule.
Together: the weights are a correct compression of the folded ones, and the
artifact computes with them what torch computes. Then the cost, run in the
artifact's own arithmetic against the fp32 train-time model, is measured and gated.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mobileone_cli.calibration import ImageSet, load_images, pick_evenly
from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.compress import (
    TARGET_MODES,
    check_keep_float,
    mode_info,
    refuse_keep_float,
    require_calibration,
    sensitivity,
    weight_layers,
    worst_layers,
)
from mobileone_cli.defaults import SENSITIVITY_MODES
from mobileone_cli.errors import ExportFailedError, UsageError
from mobileone_cli.export.backend import COMPRESSION_KEY, Backend, Candidate, Quantization
from mobileone_cli.export.coreml import deployment_target
from mobileone_cli.files import sha256_files
from mobileone_cli.fold import fold_state
from mobileone_cli.model import build_model
from mobileone_cli.options import (
    DEFAULT_COREML_TARGET,
    HELD_OUT_EVERY,
    ExportOptions,
    Gates,
    QuantizeOptions,
    SensitivityOptions,
)
from mobileone_cli.proof.compare import (
    STORAGE_DTYPES,
    compare,
    precision_cost,
    with_rounded_weights,
)
from mobileone_cli.proof.inputs import InputBatch
from mobileone_cli.proof.reference import ReferenceRun, run_module_reference
from mobileone_cli.results import (
    Compression,
    PrecisionCost,
    SensitivityReport,
    Verification,
    WeightCheck,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

# A correct int8 weight is within half a step of the folded one (round to nearest). In an fp16
# program the weight, the scale and the dequantized value are each rounded to fp16 too:
# measured up to 0.605 steps on the digits model; a wrong or swapped row is tens of steps off.
INT8_STEP_LIMIT = 0.75
# A k-means palette has no half-step bound: a lone weight may share a centroid with its
# neighbours. Measured in steps of the layer's spread / 2^bits (benchmarks/quantize.py):
# digits pal8 0.39, pal6 0.81, pal4 2.62; synthetic S0 pal8 0.94, pal6 1.92, pal4 3.31. A
# reversed palette puts weights up to 2^bits - 1 steps away (15 for pal4).
PALETTE_STEP_LIMIT = 6.0
# A bias stored as int32 in a QDQ graph has the step input scale x weight scale, coarse for a
# small bias: measured up to 5.1% of the largest |bias| of a layer on the digits model (ONNX
# w8a8). A reversed or changed bias is off by about 100%.
BIAS_LIMIT = 0.25
# ExecuTorch and LiteRT int8 files against their PT2E twin (the converted torch module): the
# kernels requantize in integer arithmetic where torch rounds in float, so a one-step
# difference now and then is amplified by outlier kernels. Measured: 0.018 on the digits
# (99% of samples exact), 0.108 on a synthetic S0 at 224 px (0.13 at 64 px); a tampered file
# is off by the size of its outputs (1 or more).
PT2E_RTOL = 0.25
PT2E_RULE = f"{PT2E_RTOL:g} (int8 kernels against their PT2E twin: a few output steps)"


@dataclass(frozen=True)
class Plan:
    """What `--quantize` will do, checked before any work."""

    targets: tuple[str, ...]
    """The backends that compress."""
    skipped: tuple[tuple[str, str], ...]
    """(target, why) of the bundle's targets that cannot do the mode."""


def modes_of(target: str) -> tuple[str, ...]:
    """The `--quantize` modes of a target (empty for one that does not compress)."""
    return TARGET_MODES.get(target, ())


def plan(options: ExportOptions, backends: tuple[Backend, ...]) -> Plan | None:
    """Refuse a mode a target cannot do, a mode without its calibration, and flags without
    `--quantize`, in one line and before any work; None when nothing is quantized."""
    quantize = options.quantize
    if quantize.mode is None:
        for flag, given in (("--calibration", quantize.calibration_dir is not None),
                            ("--keep-float", bool(quantize.keep_float or quantize.keep_float_count))):
            if given:
                raise UsageError(f"{flag} applies to --quantize", hint="add --quantize MODE")
        return None
    chosen, skipped = [], []
    for backend in backends:
        if quantize.mode in modes_of(backend.name):
            chosen.append(backend.name)
        elif options.is_bundle:
            skipped.append((backend.name, f"no --quantize {quantize.mode} for this target"))
        else:
            mode_info(backend.name, quantize.mode)  # raises
    if not chosen:
        doers = sorted(name for name, modes in TARGET_MODES.items() if quantize.mode in modes)
        raise UsageError(f"no target of this run does --quantize {quantize.mode}",
                         hint=f"targets with {quantize.mode}: {', '.join(doers) or 'none'}")
    count = 0 if quantize.calibration_dir is None else 1
    for target in chosen:
        info = mode_info(target, quantize.mode)
        require_calibration(info, count)
        if target == "coreml":
            _check_coreml(options, info.minimum_deployment_target)
    if quantize.keep_float or quantize.keep_float_count:
        for target in chosen:
            refuse_keep_float(target, quantize.mode)
    if quantize.keep_float_count and quantize.calibration_dir is None:
        raise UsageError("--keep-float N ranks the layers on calibration images",
                         hint="pass --calibration DIR, or name the layers: --keep-float "
                              "stage1.0.reparam_conv,linear")
    return Plan(targets=tuple(chosen), skipped=tuple(skipped))


def with_coreml_target(options: ExportOptions) -> ExportOptions:
    """The options with Core ML's target chosen: the user's, else iOS16 or, with
    `--quantize`, the oldest target whose ops the mode writes (iOS17 w8a8, iOS18 palettes)."""
    if options.coreml.target is not None:
        return options
    target = DEFAULT_COREML_TARGET
    if options.quantize.mode in modes_of("coreml"):
        target = mode_info("coreml", options.quantize.mode).minimum_deployment_target or target
    return replace(options, coreml=replace(options.coreml, target=target))


def _check_coreml(options: ExportOptions, minimum: str | None) -> None:
    mode = options.quantize.mode
    chosen = options.coreml.target
    if minimum and chosen and deployment_target(chosen) < deployment_target(minimum):
        raise UsageError(f"Core ML --quantize {mode} needs --target {minimum} or later, "
                         f"not {chosen}", hint=f"pass --target {minimum}, or leave --target out")
    if mode == "w8a8" and options.coreml.precision != "fp16":
        raise UsageError("Core ML --quantize w8a8 builds on an fp16 program",
                         hint="drop --precision fp32")


@dataclass(frozen=True)
class Prepared:
    """The images and layer choices of one quantized run."""

    calibration: ImageSet | None
    held_out: tuple[InputBatch, ...] | None
    """The inputs the fold and the cost are measured on; None: the run's own (--inputs or noise)."""
    labels: np.ndarray | None
    """True classes of the held-out images (an ImageFolder tree); None without."""
    keep_float: tuple[str, ...]
    held_out_note: str | None
    """How the held-out images were chosen, for the record."""


def load_inputs(options: ExportOptions) -> Prepared:
    """Calibration images and held-out inputs (before the fold, which runs on them)."""
    quantize = options.quantize
    size = options.input_size
    calibration = None
    held_out: tuple[InputBatch, ...] | None = None
    labels = None
    note = None
    if options.inputs_dir is not None:
        inputs = load_images(options.inputs_dir, size=size, option="--inputs")
        held_out = (InputBatch(f"{inputs.count} images from {inputs.folder.name}/ at "
                               f"{size}x{size}", inputs.array),)
        labels, note = inputs.labels, f"--inputs {inputs.folder.name}/ ({inputs.count} images)"
    if quantize.calibration_dir is not None:
        calibration = load_images(quantize.calibration_dir, size=size, option="--calibration")
        if held_out is None:
            calibration, held_out, labels, note = _split(calibration, quantize.calibration_count)
        elif quantize.calibration_count is not None:
            calibration = _subset(calibration, quantize.calibration_count)
    return Prepared(calibration=calibration, held_out=held_out, labels=labels,
                    keep_float=quantize.keep_float, held_out_note=note)


def _split(images: ImageSet, count: int | None) -> tuple[ImageSet, tuple[InputBatch, ...],
                                                          np.ndarray | None, str]:
    """Every `HELD_OUT_EVERY`-th image held out for the cost, the rest to calibrate."""
    held = [index for index in range(images.count) if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    if not held:
        raise UsageError(f"--calibration {images.folder.name} holds {images.count} images: too "
                         f"few to hold out every {HELD_OUT_EVERY}th for the cost",
                         hint="add images, or pass held-out images with --inputs DIR")
    rest = [index for index in range(images.count) if index not in set(held)]
    calibration = _take(images, rest)
    if count is not None:
        calibration = _subset(calibration, count)
    batch = (InputBatch(f"{len(held)} held-out images of {images.folder.name}/ (every "
                        f"{HELD_OUT_EVERY}th)", images.array[held]),)
    labels = None if images.labels is None else images.labels[held]
    return calibration, batch, labels, (f"every {HELD_OUT_EVERY}th image of --calibration "
                                        f"{images.folder.name}/ ({len(held)} images)")


def _take(images: ImageSet, indices: list[int]) -> ImageSet:
    files = [images.files[index] for index in indices]
    return replace(images, files=tuple(files), array=images.array[indices],
                   labels=None if images.labels is None else images.labels[indices],
                   sha256=sha256_files(images.folder, files))


def _subset(images: ImageSet, count: int) -> ImageSet:
    if count > images.count:
        raise UsageError(f"--calibration-count {count} asks for more images than "
                         f"{images.folder.name} has to calibrate with ({images.count})",
                         hint=f"pass --calibration-count {images.count} or add images")
    return _take(images, pick_evenly(list(range(images.count)), count))


def resolve_keep_float(prepared: Prepared, options: QuantizeOptions,
                       state: Mapping[str, torch.Tensor], build: Any) -> tuple[str, ...]:
    """`--keep-float` names checked against the folded layers, plus the N worst by sensitivity."""
    layers = weight_layers(state)
    named = check_keep_float(options.keep_float, layers)
    if not options.keep_float_count:
        return named
    if options.keep_float_count > len(layers):
        raise UsageError(f"--keep-float {options.keep_float_count} is more than the model's "
                         f"{len(layers)} weighted layers")
    assert prepared.calibration is not None  # plan() has checked
    ranked = sensitivity(build, state, prepared.calibration.array)
    worst = worst_layers(ranked, options.keep_float_count)
    return tuple(dict.fromkeys((*named, *worst)))


def quantization_for(target: str, options: QuantizeOptions, prepared: Prepared,
                     keep_float: tuple[str, ...]) -> tuple[Quantization, Compression]:
    """The backend's instructions and the record its file keeps."""
    info = mode_info(target, str(options.mode))
    calibration = prepared.calibration if info.quantizes_activations else None
    method = options.calibration_method if target == "onnx" and calibration else None
    record = None
    if calibration is not None:
        record = {"count": calibration.count, "sha256": calibration.sha256,
                  "folder": calibration.folder.name, "method": method or "minmax",
                  "held_out": prepared.held_out_note}
    quantization = Quantization(mode=info.mode,
                                calibration=None if calibration is None else calibration.array,
                                calibration_method=method, keep_float=keep_float)
    compression = Compression(mode=info.mode, weights=info.weights,
                              activations=info.activations, kept_float=keep_float,
                              calibration=record)
    return quantization, compression


def with_record(metadata: Mapping[str, str], compression: Compression) -> dict[str, str]:
    """The file metadata with the compression record added."""
    return {**metadata, COMPRESSION_KEY: json.dumps(compression.to_dict(), sort_keys=True)}


# --- the proof ----------------------------------------------------------------------------


def prove_compressed(candidate: Candidate, reference: ReferenceRun, *, model: torch.nn.Module,
                     rtol: float | None, gates: Gates, labels: np.ndarray | None = None,
                     tight_reference: torch.nn.Module | None = None,
                     ) -> tuple[Verification, PrecisionCost]:
    """The weight check, the conversion proof and the gated cost of a compressed artifact."""
    declared = candidate.declared
    compression = declared.compression
    assert compression is not None
    min_cosine, min_agreement = gates.cost_gates(quantized=True)
    cost = precision_cost(reference, candidate.run, precision=compression.mode,
                          min_cosine=min_cosine, min_agreement=min_agreement, labels=labels)
    if candidate.stored_weights is None or candidate.run_full_precision is None:
        if tight_reference is None:
            raise UsageError(
                f"a {compression.mode} {declared.runtime.split()[0]} file is proven at export "
                "against its quantized torch twin, which verify cannot rebuild",
                hint="re-export it to prove it; `verify --manifest` checks its sha256")
        tight = run_module_reference(tight_reference, reference.batches,
                                     name="the quantized torch model before lowering (PT2E)",
                                     is_classifier=reference.is_classifier)
        verification = compare(tight, candidate.run, rtol=PT2E_RTOL if rtol is None else rtol)
        rule = (PT2E_RULE if rtol is None else verification.tolerance_rule)
        return replace(verification, tolerance_rule=rule), cost
    stored = candidate.stored_weights()
    equivalent = candidate.as_torch(model) if candidate.as_torch else model
    dtype = STORAGE_DTYPES.get(declared.precision)
    holder, check = _with_stored_weights(equivalent, stored, dtype=dtype, mode=compression.mode)
    same_weights = run_module_reference(
        holder, reference.batches, name=f"folded model with the artifact's {compression.mode} "
        "weights, float activations", is_classifier=reference.is_classifier)
    verification = compare(same_weights, candidate.run_full_precision, rtol=rtol)
    return replace(verification, weights=check), cost


def needs_its_twin(candidate: Candidate) -> bool:
    """A compressed file whose proof needs the torch twin only its export run holds."""
    return (candidate.declared.compression is not None
            and candidate.declared.compression.mode != "fp16"
            and (candidate.stored_weights is None or candidate.run_full_precision is None))


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _with_stored_weights(module: torch.nn.Module, stored: Mapping[str, np.ndarray], *,
                         dtype: str | None, mode: str) -> tuple[torch.nn.Module, WeightCheck]:
    """A float32 copy of `module` (floats rounded to `dtype`) holding the artifact's weights,
    and the check of those weights against `module`'s own."""
    import torch

    holder = (copy.deepcopy(module).float().eval() if dtype is None
              else with_rounded_weights(module, dtype))
    state = holder.state_dict()
    original = module.state_dict()
    keys = {_underscored(key): key for key, tensor in state.items()
            if key.endswith((".weight", ".bias")) and tensor.is_floating_point()}
    worst_layer, worst_error, matched = "", 0.0, 0
    worst_bias, worst_bias_error = "", 0.0
    for name, stored_value in stored.items():
        key = _match(_underscored(name), keys)
        if key is None:
            raise ExportFailedError(f"the artifact stores a tensor '{name}' the folded model "
                                    "does not have")
        target = state[key]
        value = torch.from_numpy(stored_value.astype("float32")).reshape(target.shape)
        folded = original[key].detach().double()
        if target.dim() >= 2:
            error = _steps(value.double(), folded, mode=mode)
            matched += 1
            if not error <= worst_error:
                worst_layer, worst_error = name.removesuffix(".weight"), error
        else:
            scale = float(folded.abs().max()) or 1.0
            error = float((value.double() - folded).abs().max()) / scale
            if not error <= worst_bias_error:
                worst_bias, worst_bias_error = name.removesuffix(".bias"), error
        with torch.no_grad():
            target.copy_(value)
    scheme = (f"palette of 2^{mode.removeprefix('pal')} per group" if mode.startswith("pal")
              else "int8 per output channel")
    limit = PALETTE_STEP_LIMIT if mode.startswith("pal") else INT8_STEP_LIMIT
    return holder, WeightCheck(scheme=scheme, layers=matched, worst_layer=worst_layer,
                               worst_error=worst_error, limit=limit, worst_bias=worst_bias,
                               worst_bias_error=worst_bias_error, bias_limit=BIAS_LIMIT)


def _match(layer: str, keys: Mapping[str, str]) -> str | None:
    """The module key whose underscored layer name is `layer` or ends with `_<layer>`
    (a wrapper's prefix); or whose name `layer` ends with (the target's own prefix)."""
    if layer in keys:
        return keys[layer]
    found = [key for name, key in keys.items()
             if name.endswith(f"_{layer}") or layer.endswith(f"_{name}")]
    return found[0] if len(found) == 1 else None


def _steps(stored: torch.Tensor, folded: torch.Tensor, *, mode: str) -> float:
    """The largest |stored - folded| in steps of the mode's grid."""
    import torch

    if mode.startswith("pal"):
        spread = float(folded.max() - folded.min()) or 1.0
        return float((stored - folded).abs().max()) / (spread / 2 ** int(mode.removeprefix("pal")))
    flat_stored = stored.reshape(len(stored), -1)
    flat_folded = folded.reshape(len(folded), -1)
    step = flat_folded.abs().amax(dim=1, keepdim=True) / 127
    error = (flat_stored - flat_folded).abs() / torch.where(step > 0, step, torch.ones_like(step))
    return float(error.max())


# --- report --sensitivity -----------------------------------------------------------------

def sensitivity_report(options: SensitivityOptions) -> SensitivityReport:
    """Every folded layer of `options.source`, worst first, by the output error of giving only
    that layer int8 per-channel weights, on the calibration images."""
    if options.mode not in SENSITIVITY_MODES:
        raise UsageError(f"report --sensitivity ranks int8 weights, not --quantize {options.mode}",
                         hint=f"pass --quantize {' or '.join(SENSITIVITY_MODES)}")
    loaded = load_checkpoint(options.source, ema=options.ema)
    images = load_images(options.calibration_dir, size=options.input_size,
                         count=options.calibration_count)
    state = loaded.state if loaded.is_folded else fold_state(loaded.spec, loaded.state)
    folded_spec = loaded.spec.folded()
    ranked = sensitivity(lambda weights: build_model(folded_spec, weights), state, images.array)
    return SensitivityReport(source=options.source, variant=loaded.variant,
                             scheme=mode_info("onnx", options.mode).weights, images=images.count,
                             images_sha256=images.sha256, layers=ranked)

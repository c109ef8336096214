"""The folded model as a Core ML ML Program (`.mlpackage`), verified on Linux.

Core ML cannot run off a Mac, so `candidate` evaluates the saved program with
`mobileone_cli.mil` (numpy, op by op) and the package is verified like every
other artifact, with `verify.compare` against the train-time model.

Shape: a fixed 1 x 3 x S x S input named `image`. Apps feed one camera frame
at a time, and a fixed shape keeps the whole model eligible for the Neural
Engine; a flexible batch or size is not offered. `candidate` runs a larger batch one
sample at a time and refuses other sizes with a `ValueError` naming the shape.

Image input: Core ML's image preprocessing is `pixel * scale + bias[channel]`,
one scale for all channels, so ImageNet's per-channel std cannot go there.
`export` folds 1/std into the input channels of the stem conv of a copy of
the model and gives the ImageType scale 1/255 and bias -mean. That is exact
(zero padding of the stem stays exact, because a normalised 0 is the
preprocessed 0); the recipe often seen, scale 1/(255 * mean(std)), is not.

Precision: `compute_precision=FLOAT16` (the default) stores weights and
activations in fp16, which is what the GPU and the Neural Engine compute in.
Inputs and outputs stay fp32 whatever the precision (coremltools would make
them fp16 for an iOS 16+ target), so apps pass and read ordinary floats. The
fp16 program cannot meet the fp32 tolerance; `fp16_tolerance` derives its own.

Reproducibility: as coremltools saves it, a package differs from run to run
in two files. `Manifest.json` names the package's two items (program and
weights) with random UUIDs, and `model.mlmodel` serialises its protobuf maps
(metadata, op attributes) in hash order, which changes with PYTHONHASHSEED,
so two processes write different bytes for the same program. `export`
rewrites both: UUIDs derived from each item's path, and the program
serialised deterministically (the same message, keys sorted). The weights
(`weight.bin`) were already byte-identical. The same model, metadata, options
and library versions therefore give the same bytes; another coremltools or
torch version may legitimately change the program and the weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli import __version__
from mobileone_cli.errors import ExportFailedError, OutputError, UsageError
from mobileone_cli.mil import run_program, summarize_program
from mobileone_cli.quiet import captured

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mobileone_cli.verify import ReferenceRun, Verification

INPUT_NAME = "image"
STEM_WEIGHT = "stage0.reparam_conv.weight"
PACKAGE_SUFFIX = ".mlpackage"
MANIFEST = "Manifest.json"
# Namespace of the package's item identifiers (uuid5 of each item's path): any fixed UUID works.
_ITEM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "mobileone.mlpackage")
PRECISIONS = ("fp16", "fp32")
# ML Programs exist from iOS 15 / macOS 12 (Core ML specification version 6) on.
MLPROGRAM_MINIMUM_TARGET = "iOS15"
PIXEL_RANGE = 255.0
# coremltools names a classifier's outputs after `ClassifierConfig.predicted_feature_name`.
LABEL_OUTPUT = "classLabel"
PROBABILITIES_OUTPUT = f"{LABEL_OUTPUT}_probs"
# The softmax ahead of a classifier's `classify` op; not an output of the package.
_SOFTMAX_NAME = "probabilities"
# torch 2.13 deprecates torch.jit.trace (and trace_method, which it calls); coremltools
# converts TorchScript, and the torch.export path is a different, beta frontend.
_TRACE_DEPRECATED = r"`torch\.jit\.trace(_method)?` is deprecated"
# coremltools drops the TemporaryDirectory of its weights without closing it.
_TEMPORARY_DIRECTORY = r"Implicitly cleaning up"

# --- fp16 tolerance, see `fp16_tolerance` -------------------------------------------------
FP16_FLOOR_FACTOR = 2.0
FP16_MIN_RTOL = 1e-3
FP16_TOLERANCE_RULE = f"max({FP16_MIN_RTOL:g}, {FP16_FLOOR_FACTOR:g} x fp16 noise floor)"


@dataclass(frozen=True)
class CoreMLOptions:
    """How to convert and describe the package; the defaults suit an iPhone app."""

    target: str = "iOS16"
    """Minimum deployment target, a `coremltools.target` name (iOS15+, macOS12+, ...)."""
    precision: str = "fp16"
    """Compute precision, "fp16" or "fp32"; inputs and outputs are fp32 either way."""
    image_input: bool = False
    """An RGB image input (0-255 pixels, as from the camera) instead of a normalised tensor."""
    labels: tuple[str, ...] | None = None
    """Class labels, one per class: makes the package a classifier with probabilities."""
    input_size: int = 224
    """The fixed height and width of the input."""
    description: str | None = None
    """Short description; default "MobileOne <variant> folded by mobileone <version>"."""
    version: str | None = None
    author: str | None = None
    license: str | None = None


def export(
    model: torch.nn.Module,
    path: Path,
    *,
    metadata: dict[str, str],
    options: CoreMLOptions,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    output_name: str = "logits",
) -> None:
    """Convert the folded model to an ML Program and save the `.mlpackage` folder at `path`.

    The caller passes a temporary path and moves it into place after
    verification. `metadata` becomes the package's user-defined metadata,
    exactly (coremltools' own version keys are replaced). `mean` and `std` are
    the normalisation the model was trained with; an image-input package
    applies it to 0-255 pixels. Prints nothing: coremltools' log lines,
    warnings and progress bars are silenced.
    """
    import torch

    if path.suffix != PACKAGE_SUFFIX:
        raise OutputError(f"a Core ML package is a folder ending in {PACKAGE_SUFFIX}: {path}",
                          hint=f"name the output {path.stem}{PACKAGE_SUFFIX}")
    target = _deployment_target(options.target)
    _check_precision(options.precision)
    example = torch.zeros(1, 3, options.input_size, options.input_size)
    with torch.inference_mode():
        example_output = model(example)
    _check_labels(options.labels, example_output)
    prepared = _prepare(model, options=options, std=std)
    with _quiet_coremltools():
        import coremltools as ct

        traced = torch.jit.trace(prepared, example)
        try:
            mlmodel = ct.convert(
                traced,
                inputs=[_input_type(options, mean=mean)],
                outputs=[_output_type(options, output_name)],
                classifier_config=(
                    ct.ClassifierConfig(list(options.labels)) if options.labels else None
                ),
                convert_to="mlprogram",
                minimum_deployment_target=target,
                compute_precision=(
                    ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32
                ),
            )
        except Exception as error:  # coremltools raises anything from ValueError to AssertionError
            raise ExportFailedError(
                f"coremltools could not convert the model: {_first_line(error)}"
            ) from error
    _describe(mlmodel, metadata=metadata, options=options, output_name=output_name,
              features=example_output.dim() == 4, mean=mean, std=std)
    try:
        mlmodel.save(str(path))  # replaces whatever is at `path`
    finally:
        # coremltools keeps a temporary copy of the package until exit: a large folder per export.
        if mlmodel.is_temp_package:
            shutil.rmtree(mlmodel.package_path, ignore_errors=True)
    _make_reproducible(path)


def _make_reproducible(package: Path) -> None:
    """Rewrite the two files coremltools writes differently each time (see the module docstring)."""
    from coremltools.proto import Model_pb2

    manifest_file = package / MANIFEST
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    entries = manifest["itemInfoEntries"]
    renamed = {old: str(uuid.uuid5(_ITEM_NAMESPACE, entry["path"])) for old, entry in entries.items()}
    root_path = entries[manifest["rootModelIdentifier"]]["path"]
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in entries.items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    # The layout libmodelpackage writes: sorted keys, 4-space indent, final newline.
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n",
                             encoding="utf-8")
    model_file = package / "Data" / root_path
    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    model_file.write_bytes(spec.SerializeToString(deterministic=True))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _deployment_target(name: str) -> Any:
    with _quiet_coremltools():
        import coremltools as ct

    target = getattr(ct.target, name, None)
    if not isinstance(target, ct.target):
        choices = ", ".join(member for member in ct.target.__members__)
        raise UsageError(f"unknown deployment target '{name}'", hint=f"choose one of {choices}")
    if target < ct.target[MLPROGRAM_MINIMUM_TARGET]:
        raise UsageError(
            f"deployment target {name} is too old for an ML Program",
            hint="choose iOS15 / macOS12 / watchOS8 / tvOS15 or later",
        )
    return target


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'", hint=f"choose {' or '.join(PRECISIONS)}")


def _check_labels(labels: tuple[str, ...] | None, output: torch.Tensor) -> None:
    if labels is None:
        return
    if output.dim() != 2:
        raise UsageError("labels need a classifier, and the model is headless (no classes)",
                         hint="export without labels")
    classes = int(output.shape[1])
    if len(labels) != classes:
        raise UsageError(f"labels file has {len(labels)} labels, the model has {classes} classes")


def _prepare(
    model: torch.nn.Module, *, options: CoreMLOptions, std: tuple[float, float, float]
) -> torch.nn.Module:
    """The module to trace: std folded into the stem for image input, a softmax for a classifier."""
    import torch

    prepared = model
    if options.image_input:
        prepared = fold_std_into_stem(model, std)
    if options.labels:
        # ClassifierConfig alone passes the model's output through as "probabilities".
        prepared = torch.nn.Sequential(prepared, torch.nn.Softmax(dim=1)).eval()
    return prepared


def fold_std_into_stem(
    model: torch.nn.Module, std: tuple[float, float, float]
) -> torch.nn.Module:
    """A copy of `model` that takes `x * std` (per channel) where `model` takes `x`.

    The stem conv is linear in its input, so dividing its kernel's input
    channel c by std[c] moves the division from the input into the weights;
    the bias is untouched, and so is zero padding (0 * anything = 0).
    `model` is not modified.
    """
    import torch

    state = model.state_dict()
    if STEM_WEIGHT not in state:
        raise UsageError("image input needs a folded MobileOne (no stage0.reparam_conv found)",
                         hint="fold the checkpoint first, or export a tensor input")
    weight = state[STEM_WEIGHT]
    divisor = torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    prepared = copy.deepcopy(model)
    prepared.load_state_dict({**state, STEM_WEIGHT: (weight.double() / divisor).to(weight.dtype)})
    return prepared.eval()


def _input_type(options: CoreMLOptions, *, mean: tuple[float, float, float]) -> Any:
    import coremltools as ct
    import numpy as np

    shape = (1, 3, options.input_size, options.input_size)
    if not options.image_input:
        return ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)
    return ct.ImageType(
        name=INPUT_NAME,
        shape=shape,
        scale=1.0 / PIXEL_RANGE,
        bias=[-value for value in mean],
        color_layout=ct.colorlayout.RGB,
    )


def _output_type(options: CoreMLOptions, output_name: str) -> Any:
    import coremltools as ct
    import numpy as np

    # Naming the output also stops coremltools warning that it renamed it.
    return ct.TensorType(name=_SOFTMAX_NAME if options.labels else output_name, dtype=np.float32)


def _describe(
    mlmodel: Any,
    *,
    metadata: dict[str, str],
    options: CoreMLOptions,
    output_name: str,
    features: bool,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> None:
    """Set what the package says about itself, replacing coremltools' own metadata."""
    variant = metadata.get("mobileone.variant", "custom")
    mlmodel.short_description = options.description or (
        f"MobileOne {variant.upper() if variant != 'custom' else variant} "
        f"folded by mobileone {__version__}"
    )
    for field in ("version", "author", "license"):
        value = getattr(options, field)
        if value is not None:
            setattr(mlmodel, field, value)
    user_defined = mlmodel.user_defined_metadata
    user_defined.clear()  # com.github.apple.coremltools.{version,source,...}: host-dependent
    for key, value in sorted(metadata.items()):
        user_defined[key] = value
    size = options.input_size
    if options.image_input:
        mlmodel.input_description[INPUT_NAME] = (
            f"RGB image, {size} x {size} (normalised inside the model)"
        )
    else:
        mlmodel.input_description[INPUT_NAME] = (
            f"RGB image, 1 x 3 x {size} x {size} float32, normalised: (pixel / 255 - mean) / std "
            f"with mean {_numbers(mean)} and std {_numbers(std)}"
        )
    if options.labels:
        mlmodel.output_description[LABEL_OUTPUT] = "The most probable class label"
        mlmodel.output_description[PROBABILITIES_OUTPUT] = "Probability of each class label"
    elif features:
        mlmodel.output_description[output_name] = "Feature map of the last stage (N x C x H/32 x W/32)"
    else:
        mlmodel.output_description[output_name] = "Class logits (before softmax)"


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{value:g}" for value in values) + ")"


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    """Silence coremltools while it imports and converts, so the CLI prints nothing extra.

    Its log lines (untested torch version, no Core ML runtime off a Mac) go
    through the `coremltools` logger, which a level mutes. Its progress bars are
    tqdm's, which obeys TQDM_DISABLE only if set before tqdm's first import
    (`import torch` has done that already), so stderr, where tqdm draws, is
    redirected instead. Python warnings (renamed outputs, torch's deprecation
    of tracing) are filtered by message.
    """
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # Descriptor-level: importing coremltools imports torchao, whose C++ loader and
        # torch's C++ logging write to descriptor 2, which redirect_stderr cannot see.
        with warnings.catch_warnings(), captured():
            warnings.filterwarnings("ignore", message=_TRACE_DEPRECATED, category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*has been renamed")
            warnings.filterwarnings("ignore", message=_TEMPORARY_DIRECTORY,
                                    category=ResourceWarning)
            yield
    finally:
        logger.setLevel(level)


# --- Verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageDescription:
    """What a saved package is, as far as verifying it goes."""

    input_shape: tuple[int, ...]
    image_input: bool
    """The input is an image (0-255 pixels), not a normalised tensor."""
    precision: str
    """"fp16" when the program computes in fp16 (any fp16 value in it), else "fp32"."""
    is_classifier: bool
    output: str
    """The output `candidate` returns: the probabilities of a classifier, else the only one."""


def describe(path: Path) -> PackageDescription:
    """Read a saved `.mlpackage`'s input, precision and kind without evaluating it."""
    summary = summarize_program(path)
    with _quiet_coremltools():
        import coremltools as ct
        from coremltools.proto import MIL_pb2

        spec = ct.utils.load_spec(str(path))
    described = {feature.name: feature for feature in spec.description.input}
    if INPUT_NAME not in described or len(summary.inputs) != 1:
        raise ExportFailedError(f"{path} does not take one input named '{INPUT_NAME}'")
    _name, _dtype, shape = summary.inputs[0]
    if not all(isinstance(size, int) for size in shape):
        raise ExportFailedError(f"{path} has a flexible input shape {shape}; "
                                "mobileone writes and checks fixed ones")
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    fp16 = any(
        output.type.WhichOneof("type") == "tensorType"
        and output.type.tensorType.dataType == MIL_pb2.DataType.FLOAT16
        for op in operations
        for output in op.outputs
    )
    probabilities = spec.description.predictedProbabilitiesName
    return PackageDescription(
        input_shape=tuple(int(size) for size in shape),
        image_input=described[INPUT_NAME].type.WhichOneof("Type") == "imageType",
        precision="fp16" if fp16 else "fp32",
        is_classifier=bool(probabilities),
        output=probabilities or summary.outputs[0],
    )


def candidate(
    path: Path, *, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> Callable[[np.ndarray], np.ndarray]:
    """The saved package, evaluated by `mil.run_program`, as a verification candidate.

    Takes the normalised float32 N x 3 x H x W batch the reference uses. An
    image-input package is fed the same images as 0-255 pixels,
    `(x * std + mean) * 255` (not clipped or rounded: the check is of the
    arithmetic, not of the camera). A classifier returns its probabilities
    (compare with `softmax_reference`). The program takes one image, so a batch
    runs one sample at a time; another height or width raises a `ValueError`.
    """
    import numpy as np

    info = describe(path)
    pixel_scale = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1) * PIXEL_RANGE
    pixel_offset = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1) * PIXEL_RANGE

    def run(array: np.ndarray) -> np.ndarray:
        _check_fits(array, info.input_shape, name=path.name)
        if info.image_input:
            array = (array * pixel_scale + pixel_offset).astype(np.float32)
        outputs = [
            run_program(path, {INPUT_NAME: array[index : index + 1]})[info.output]
            for index in range(len(array))
        ]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    return run


def _check_fits(array: np.ndarray, shape: tuple[int, ...], *, name: str) -> None:
    import numpy as np

    expected = " x ".join(str(size) for size in shape)
    if array.dtype != np.float32 or array.ndim != len(shape) or array.shape[1:] != shape[1:]:
        got = " x ".join(str(size) for size in array.shape)
        raise ValueError(f"{name} takes input of shape {expected}; got {array.dtype} {got}")


def op_counts(path: Path) -> dict[str, int]:
    """Op type -> count over the program's main function (weights, `const`, not counted)."""
    return summarize_program(path).op_counts


def softmax_reference(reference: ReferenceRun) -> ReferenceRun:
    """`reference` with softmax-ed outputs, to verify a classifier's probabilities.

    The fp32 outputs are soft-maxed in float32 and the float64 ones in float64,
    so the noise floor still measures fp32 rounding against exact arithmetic.
    """
    return replace(
        reference,
        outputs_fp32=tuple(_softmax(output) for output in reference.outputs_fp32),
        outputs_fp64=tuple(_softmax(output) for output in reference.outputs_fp64),
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Fp16Tolerance:
    """The tolerance of an fp16 package, and the measurement it derives from."""

    noise_floor: float
    """Relative error of the folded model in torch float16 against the float64 train-time model."""
    rtol: float
    rule: str

    def apply(self, verification: Verification) -> Verification:
        """`verification` (from `compare(..., rtol=self.rtol)`) reporting this floor and rule."""
        floor = self.noise_floor
        return replace(
            verification,
            noise_floor=floor,
            floor_ratio=verification.max_rel_diff / floor if floor > 0 else None,
            rtol=self.rtol,
            tolerance_rule=self.rule,
        )


def fp16_noise_floor(
    model: torch.nn.Module, reference: ReferenceRun, *, probabilities: bool = False
) -> float:
    """How far fp16 arithmetic alone moves the folded model's output (relative, like compare).

    A float16 copy of `model` (the folded fp32 model given to `export`: its
    weights rounded to fp16 as the converter rounds them) runs in torch on the
    reference's inputs, rounding every activation to fp16 after every op as
    the fp16 program does; its error against `reference.outputs_fp64`, over
    the reference's scale, is the floor. `probabilities`: the reference holds
    soft-maxed outputs (`softmax_reference`), so the fp16 outputs are too.
    """
    import numpy as np
    import torch

    half = copy.deepcopy(model).half().eval()
    worst = 0.0
    with torch.inference_mode():
        for batch, exact in zip(reference.batches, reference.outputs_fp64):
            output = half(torch.from_numpy(batch.array).half()).double().numpy()
            if probabilities:
                output = _softmax(output)
            difference = np.abs(output - exact)
            worst = max(worst, float(difference.max()) if np.isfinite(difference).all()
                        else float("inf"))
    return worst / reference.scale


def fp16_tolerance(
    model: torch.nn.Module, reference: ReferenceRun, *, probabilities: bool = False
) -> Fp16Tolerance:
    """The tolerance of an fp16 package: max(1e-3, 2 x the fp16 noise floor).

    Derivation. An fp16 program rounds every weight once, when it is stored,
    and every activation after every op, each time by up to 2^-11 (4.9e-4) of
    its size; the roundings compound through S0's 88 ops and S4's 160. What
    that does to the output depends on the weights and the input size, so it
    is measured, not guessed: `fp16_noise_floor` runs the folded model in
    torch float16, which rounds the same values at the same places (fp32
    accumulation inside conv and linear, one rounding per op), and compares it
    with the float64 train-time model. On the synthetic and reference S0 and
    S4 checkpoints at 96-224 px the floor is 2.7e-2 to 2.4e-1 of the largest
    logit, against 1e-5 to 7e-5 for fp32: their random weights make the
    logits small differences of features 10-50x larger, which amplifies the
    features' rounding (trained weights should sit lower; the rule adapts).

    The program's own error is another draw of the same noise: the numpy
    evaluator and torch round the same values but sum in different orders,
    so about 0.1% of fp16 roundings fall the other way and the network
    spreads them. Measured: 0.63-1.34x the floor over 17 packages (S0, S4,
    64-224 px, tensor and image input, logits and probabilities), 0.87-1.15x
    over 30 single images. A factor 2 passes every true export with 1.5x to
    spare; that `compare` measures against the fp32 rather than the float64
    reference moves the figure by 1e-5, nothing at this scale. The 1e-3
    minimum (two fp16 roundings) keeps a tiny floor from demanding more than
    fp16 can give. Corruption lands well past it: one fp16 weight of the
    stem with its sign flipped gives 7.6x the S0 tolerance, one mid-network
    conv scaled by 1.05 gives 2.5x. Errors below the tolerance (a few
    percent of the logit scale here) cannot be told from fp16 rounding;
    the fp32 check of the folded model, before export, is the fine one.
    """
    floor = fp16_noise_floor(model, reference, probabilities=probabilities)
    return Fp16Tolerance(
        noise_floor=floor,
        rtol=max(FP16_MIN_RTOL, FP16_FLOOR_FACTOR * floor),
        rule=FP16_TOLERANCE_RULE,
    )

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

import copy
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli import __version__
from mobileone_cli.compress import compress_coreml, decompressed_weights
from mobileone_cli.errors import BadArtifactError, ExportFailedError, OutputError, UsageError
from mobileone_cli.export.backend import (
    Candidate,
    WriteContext,
    check_fits,
    first_line,
    in_chunks,
    read_compression,
)
from mobileone_cli.mil import quiet_coremltools, read_spec, run_program, summarize_program
from mobileone_cli.options import DEFAULT_COREML_TARGET, CoreMLOptions
from mobileone_cli.proof.inputs import IMAGENET_MEAN, IMAGENET_STD
from mobileone_cli.results import Declared

if TYPE_CHECKING:
    import numpy as np
    import torch

name = "coreml"
suffix = ".mlpackage"
extra = None
INPUT_NAME = "image"
PACKAGE_SUFFIX = ".mlpackage"
MANIFEST = "Manifest.json"
# Namespace of the package's item identifiers (uuid5 of each item's path): any fixed UUID works.
_ITEM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "mobileone.mlpackage")
PRECISIONS = ("fp16", "fp32")
# ML Programs exist from iOS 15 / macOS 12 (Core ML specification version 6) on.
MLPROGRAM_MINIMUM_TARGET = "iOS15"
PIXEL_RANGE = 255.0
_FAMILY_NAMES = {"mobileone": "MobileOne", "repvit": "RepViT"}
# coremltools names a classifier's outputs after `ClassifierConfig.predicted_feature_name`.
LABEL_OUTPUT = "classLabel"
PROBABILITIES_OUTPUT = f"{LABEL_OUTPUT}_probs"
# The softmax ahead of a classifier's `classify` op; not an output of the package.
_SOFTMAX_NAME = "probabilities"



def missing() -> str | None:
    """coremltools is a dependency of the tool itself."""
    return None


def companions(path: Path) -> tuple[Path, ...]:
    """Nothing ships beside this target's file."""
    return ()


def write(
    model: torch.nn.Module,
    path: Path,
    *,
    context: WriteContext,
) -> None:
    """Convert the folded model to an ML Program and save the `.mlpackage` folder at `path`.

    The caller passes a temporary path and moves it into place after
    verification. The context's metadata becomes the package's user-defined
    metadata, exactly (coremltools' own version keys are replaced); its `mean`
    and `std` are the normalisation the model was trained with, which an
    image-input package applies to 0-255 pixels; its labels make a classifier.
    Prints nothing: coremltools' log lines,
    warnings and progress bars are silenced.
    """
    import torch

    if path.suffix != PACKAGE_SUFFIX:
        raise OutputError(f"a Core ML package is a folder ending in {PACKAGE_SUFFIX}: {path}",
                          hint=f"name the output {path.stem}{PACKAGE_SUFFIX}")
    options: CoreMLOptions = context.options or CoreMLOptions()
    labels, size, output_name = context.labels, context.input_size, context.output_name
    target = deployment_target(options.target or DEFAULT_COREML_TARGET)
    _check_precision(options.precision)
    example = torch.zeros(1, 3, size, size)
    with torch.inference_mode():
        example_output = model(example)
    _check_labels(labels, example_output)
    prepared = _prepare(model, image_input=options.image_input, labels=labels, std=context.std)
    with quiet_coremltools():
        import coremltools as ct

        traced = torch.jit.trace(prepared, example)
        try:
            mlmodel = ct.convert(
                traced,
                inputs=[_input_type(image_input=options.image_input, size=size, mean=context.mean)],
                outputs=[_output_type(labels=labels, output_name=output_name)],
                classifier_config=ct.ClassifierConfig(list(labels)) if labels else None,
                convert_to="mlprogram",
                minimum_deployment_target=target,
                compute_precision=(
                    ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32
                ),
            )
        except Exception as error:  # coremltools raises anything from ValueError to AssertionError
            raise ExportFailedError(
                f"coremltools could not convert the model: {first_line(error)}"
            ) from error
    _describe(mlmodel, context=context, options=options, features=example_output.dim() == 4)
    quantization = context.quantization
    with tempfile.TemporaryDirectory(prefix="mobileone-coreml-") as folder:
        float_package = path if quantization is None else Path(folder) / path.name
        try:
            mlmodel.save(str(float_package))  # replaces whatever is at `float_package`
        finally:
            # coremltools keeps a temporary copy of the package until exit: a large folder.
            if mlmodel.is_temp_package:
                shutil.rmtree(mlmodel.package_path, ignore_errors=True)
        if quantization is not None:
            image_input = options.image_input
            calibration = quantization.calibration
            if calibration is not None and image_input:  # the program takes 0-255 pixels
                calibration = _to_pixels(calibration, context.mean, context.std)
            compress_coreml(float_package, path, mode=quantization.mode,
                            calibration=calibration, keep_float=quantization.keep_float)
    _make_reproducible(path)


def _to_pixels(batch: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalised N x 3 x H x W as the 0-255 pixels an image input takes (as `open` feeds them)."""
    import numpy as np

    scale = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1) * PIXEL_RANGE
    offset = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1) * PIXEL_RANGE
    return (batch * scale + offset).astype(np.float32)


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


def deployment_target(name: str) -> Any:
    """The `coremltools.target` called `name`; a UsageError if unknown or older than iOS 15."""
    with quiet_coremltools():
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
    model: torch.nn.Module, *, image_input: bool, labels: tuple[str, ...] | None,
    std: tuple[float, float, float],
) -> torch.nn.Module:
    """The module to trace: std folded into the stem for image input, a softmax for a classifier."""
    import torch

    prepared = model
    if image_input:
        prepared = fold_std_into_stem(model, std)
    if labels:
        # ClassifierConfig alone passes the model's output through as "probabilities".
        prepared = torch.nn.Sequential(prepared, torch.nn.Softmax(dim=1)).eval()
    return prepared


def fold_std_into_stem(
    model: torch.nn.Module, std: tuple[float, float, float]
) -> torch.nn.Module:
    """A copy of `model` that takes `x * std` (per channel) where `model` takes `x`.

    The stem conv (the first conv, which reads the image: MobileOne's
    `stage0.reparam_conv`, RepViT's `stem.conv1`) is linear in its input, so
    dividing its kernel's input channel c by std[c] moves the division from the
    input into the weights; the bias is untouched, and so is zero padding
    (0 * anything = 0). `model` is not modified.
    """
    import torch

    prepared = copy.deepcopy(model)
    stem = next((module for module in prepared.modules()
                 if isinstance(module, torch.nn.Conv2d)
                 and module.in_channels == len(std) and module.groups == 1), None)
    if stem is None:
        raise UsageError("image input needs a model whose first conv reads the 3 image channels",
                         hint="export a tensor input")
    divisor = torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    with torch.no_grad():
        stem.weight.copy_((stem.weight.double() / divisor).to(stem.weight.dtype))
    return prepared.eval()


def _input_type(*, image_input: bool, size: int, mean: tuple[float, float, float]) -> Any:
    import coremltools as ct
    import numpy as np

    shape = (1, 3, size, size)
    if not image_input:
        return ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)
    return ct.ImageType(
        name=INPUT_NAME,
        shape=shape,
        scale=1.0 / PIXEL_RANGE,
        bias=[-value for value in mean],
        color_layout=ct.colorlayout.RGB,
    )


def _output_type(*, labels: tuple[str, ...] | None, output_name: str) -> Any:
    import coremltools as ct
    import numpy as np

    # Naming the output also stops coremltools warning that it renamed it.
    return ct.TensorType(name=_SOFTMAX_NAME if labels else output_name, dtype=np.float32)


def _describe(
    mlmodel: Any, *, context: WriteContext, options: CoreMLOptions, features: bool
) -> None:
    """Set what the package says about itself, replacing coremltools' own metadata."""
    metadata, output_name = context.metadata, context.output_name
    mean, std = context.mean, context.std
    variant = metadata.get("mobileone.variant", "custom")
    mlmodel.short_description = options.description or (
        f"{_FAMILY_NAMES.get(context.family, context.family)} "
        f"{variant.upper() if variant != 'custom' else variant} "
        f"folded by mobileone {__version__}"
    )
    for attribute in ("version", "author", "license"):
        value = getattr(options, attribute)
        if value is not None:
            setattr(mlmodel, attribute, value)
    user_defined = mlmodel.user_defined_metadata
    user_defined.clear()  # com.github.apple.coremltools.{version,source,...}: host-dependent
    for key, value in sorted(metadata.items()):
        user_defined[key] = value
    size = context.input_size
    if options.image_input:
        mlmodel.input_description[INPUT_NAME] = (
            f"RGB image, {size} x {size} (normalised inside the model)"
        )
    else:
        mlmodel.input_description[INPUT_NAME] = (
            f"RGB image, 1 x 3 x {size} x {size} float32, normalised: (pixel / 255 - mean) / std "
            f"with mean {_numbers(mean)} and std {_numbers(std)}"
        )
    if context.labels:
        mlmodel.output_description[LABEL_OUTPUT] = "The most probable class label"
        mlmodel.output_description[PROBABILITIES_OUTPUT] = "Probability of each class label"
    elif features:
        mlmodel.output_description[output_name] = "Feature map of the last stage (N x C x H/32 x W/32)"
    else:
        mlmodel.output_description[output_name] = "Class logits (before softmax)"


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{value:g}" for value in values) + ")"


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
    """The output `open` returns: the probabilities of a classifier, else the only one."""
    outputs: tuple[str, ...]
    """Every output the package declares."""
    deployment_target: str
    """The program's opset, which the minimum deployment target chose ("CoreML6" = iOS 16)."""


def describe(path: Path) -> PackageDescription:
    """Read a saved `.mlpackage`'s input, precision and kind without evaluating it."""
    summary = summarize_program(path)
    with quiet_coremltools():
        from coremltools.proto import MIL_pb2

    spec = read_spec(path)
    described = {feature.name: feature for feature in spec.description.input}
    if INPUT_NAME not in described or len(summary.inputs) != 1:
        raise BadArtifactError(f"{path} does not take one input named '{INPUT_NAME}'",
                               hint="pass a .mlpackage written by `mobileone export`")
    _name, _dtype, shape = summary.inputs[0]
    if not all(isinstance(size, int) for size in shape):
        raise BadArtifactError(f"{path} has a flexible input shape {shape}; "
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
        outputs=tuple(feature.name for feature in spec.description.output),
        deployment_target=str(function.opset),
    )


def open(path: Path) -> Candidate:
    """The saved package, evaluated by `mil.run_program`, as a candidate.

    Takes the normalised float32 N x 3 x H x W batch the reference uses. An
    image-input package is fed the same images as 0-255 pixels,
    `(x * std + mean) * 255` with the package's own recorded normalisation
    (not clipped or rounded: the check is of the arithmetic, not of the
    camera). A classifier returns its probabilities. The program takes one
    image, so a batch runs one sample at a time; another height or width
    raises a `ValueError`. `run_full_precision` evaluates the same program and
    stored weights with float32 arithmetic (an fp16 program's conversion proof).
    """
    import numpy as np

    info = describe(path)
    mean, std = _normalisation(path)
    compression = read_compression(read_spec(path).description.metadata.userDefined)

    def runner(arithmetic: str) -> Callable[[np.ndarray], np.ndarray]:
        def run_one(array: np.ndarray) -> np.ndarray:
            if info.image_input:
                array = _to_pixels(array, mean, std)
            outputs = run_program(path, {INPUT_NAME: array}, arithmetic=arithmetic)
            return np.asarray(outputs[info.output]).astype(np.float32, copy=False)

        def run(array: np.ndarray) -> np.ndarray:
            check_fits(array, info.input_shape, name=path.name)
            return in_chunks(run_one, array, batch=1)

        return run

    declared = Declared(
        runtime=f"mobileone MIL evaluator (coremltools {_coremltools_version()})",
        input_name=INPUT_NAME,
        input_shape=info.input_shape,
        output_names=info.outputs,
        precision=info.precision,
        outputs_probabilities=info.is_classifier,
        compression=compression,
        details={"deployment_target": info.deployment_target,
                 "image_input": info.image_input,
                 "compute_precision": info.precision},
    )
    def as_torch(model: torch.nn.Module) -> torch.nn.Module:
        return _torch_equivalent(model, image_input=info.image_input,
                                 probabilities=info.is_classifier, mean=mean, std=std)

    def stored_weights() -> dict[str, np.ndarray]:
        sample = np.zeros(info.input_shape, dtype=np.float32)
        return {f"{layer}.weight": weight
                for layer, weight in decompressed_weights(path, sample=sample).items()}

    if compression is None:
        return Candidate(declared=declared, run=runner("declared"),
                         run_full_precision=runner("fp32"), as_torch=as_torch)
    return Candidate(declared=declared, run=runner("declared"),
                     run_full_precision=runner("fp32-float-activations"), as_torch=as_torch,
                     stored_weights=stored_weights)


def _torch_equivalent(model: torch.nn.Module, *, image_input: bool, probabilities: bool,
                      mean: tuple[float, ...], std: tuple[float, ...]) -> torch.nn.Module:
    """The module the package computes, on normalised input: what `write` converted.

    An image-input package holds the stem with 1/std folded in and takes 0-255
    pixels through its own `pixel * (1/255) - mean`, which coremltools 9 keeps
    in fp32 ahead of the cast to fp16 (so they are buffers here, never rounded
    with the weights); a classifier ends in a softmax.
    """
    import torch

    layers: list[torch.nn.Module] = []
    if image_input:
        layers += [_image_preprocessing(mean, std), fold_std_into_stem(model, (std[0], std[1], std[2]))]
    else:
        layers.append(model)
    if probabilities:
        layers.append(torch.nn.Softmax(dim=1))
    return torch.nn.Sequential(*layers).eval()


def _image_preprocessing(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.nn.Module:
    """Normalised x -> pixels `(x * std + mean) * 255` (as `open` feeds them) -> the package's
    own fp32 `pixel * (1/255) - mean`."""
    import torch

    class ImagePreprocessing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            channels = (1, len(mean), 1, 1)
            # Non-persistent: out of the state dict, so never rounded with the weights.
            for name, value in (("to_pixels_scale", torch.tensor(std) * PIXEL_RANGE),
                                ("to_pixels_offset", torch.tensor(mean) * PIXEL_RANGE),
                                ("scale", torch.tensor([1.0 / PIXEL_RANGE] * len(mean))),
                                ("bias", -torch.tensor(mean))):
                self.register_buffer(name, value.reshape(channels), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            to_scale, to_offset = self.to_pixels_scale, self.to_pixels_offset
            scale, bias = self.scale, self.bias
            assert isinstance(to_scale, torch.Tensor) and isinstance(to_offset, torch.Tensor)
            assert isinstance(scale, torch.Tensor) and isinstance(bias, torch.Tensor)
            return (x * to_scale + to_offset) * scale + bias

    return ImagePreprocessing().eval()


def _normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std recorded in the package's metadata; ImageNet's where none is."""
    metadata = read_spec(path).description.metadata.userDefined
    try:
        return (tuple(json.loads(metadata["mobileone.mean"])),
                tuple(json.loads(metadata["mobileone.std"])))
    except (KeyError, ValueError, TypeError):
        return IMAGENET_MEAN, IMAGENET_STD


def _coremltools_version() -> str:
    return package_version("coremltools")


def op_counts(path: Path) -> dict[str, int]:
    """Op type -> count over the program's main function (weights, `const`, not counted)."""
    return summarize_program(path).op_counts

"""The Core ML exporter: one conv per block, fp32 I/O, exact image preprocessing, verified.

Whole variants where the variant matters (S0 without squeeze-excite at 224 once,
S4 with it at 96 px), evaluated by `mobileone_cli.mil` since Core ML cannot run
here; a tiny purpose-built model for the headless case. Packages are converted
once per module (2-4 s each).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.generate import canonical_state, spec_of
from mobileone_cli import __version__
from mobileone_cli.errors import OutputError, UsageError
from mobileone_cli.export import coreml
from mobileone_cli.export import onnx as onnx_export
from mobileone_cli.export.backend import WriteContext
from mobileone_cli.export.coreml import (
    PackageDescription,
    describe,
    fold_std_into_stem,
    op_counts,
)
from mobileone_cli.export.pipeline import prove_artifact
from mobileone_cli.fold import fold_state
from mobileone_cli.mil import run_program, summarize_program
from mobileone_cli.model import MobileOne, build_model
from mobileone_cli.options import CoreMLOptions, Gates, OnnxOptions
from mobileone_cli.proof.compare import DEFAULT_RTOL, compare
from mobileone_cli.proof.compare import torch_runner as torch_candidate
from mobileone_cli.proof.inputs import IMAGENET_MEAN, IMAGENET_STD, default_inputs
from mobileone_cli.proof.reference import ReferenceRun, run_reference
from mobileone_cli.results import PrecisionCost, Verification
from mobileone_cli.variants import VARIANTS, ArchitectureSpec, BlockSpec

ROOT = Path(__file__).resolve().parent.parent
SMALL_SIZE = 96
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")
STEM_WEIGHT = "stage0.reparam_conv.weight"
PROGRAM = Path("Data/com.apple.CoreML/model.mlmodel")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Spin-waiting OpenMP threads slow everything down on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """For the tests' own coremltools calls: its logger, its renaming warning, its progress bars."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def load_spec(path: Path) -> Any:
    with quiet_coremltools():
        import coremltools as ct

        return ct.utils.load_spec(str(path))


def export(model: torch.nn.Module, path: Path, *, metadata: dict[str, str],
           options: CoreMLOptions, size: int, labels: tuple[str, ...] | None = None,
           output_name: str = "logits") -> None:
    """The backend's `write`, as the pipeline calls it."""
    coreml.write(model, path, context=WriteContext(
        input_size=size, output_name=output_name, metadata=metadata, mean=MEAN, std=STD,
        labels=labels, options=options))


def candidate(path: Path) -> Any:
    """The package in the evaluator, computing as the device does."""
    return coreml.open(path).run


UNGATED = Gates(min_cosine=-1, min_agreement=0)


def prove(exported: Exported, path: Path | None = None,
          gates: Gates = UNGATED) -> tuple[Verification, PrecisionCost | None]:
    """The pipeline's conversion proof (and cost) of a package against `exported`'s reference."""
    return prove_artifact(coreml.open(path or exported.path), exported.reference,
                          model=exported.model, rtol=None, gates=gates)


def _metadata(variant: str, size: int) -> dict[str, str]:
    """What the caller writes, deliberately not in key order."""
    return {
        "mobileone.variant": variant,
        "mobileone.layout": "apple",
        "mobileone.input_size": json.dumps([3, size, size]),
        "mobileone.tool_version": __version__,
        "mobileone.source_sha256": "0" * 64,
    }


@dataclass(frozen=True)
class Exported:
    spec: ArchitectureSpec
    state: dict[str, torch.Tensor]
    model: MobileOne
    path: Path
    options: CoreMLOptions
    size: int
    reference: ReferenceRun
    """The square batch only: the package's input size is fixed."""


def _export_variant(folder: Path, variant: str, options: CoreMLOptions,
                    size: int = 224) -> Exported:
    spec = spec_of(variant)
    state = canonical_state(variant)
    model = build_model(spec.folded(), fold_state(spec, state))
    path = folder / f"{variant}-{options.precision}.mlpackage"
    export(model, path, metadata=_metadata(variant, size), options=options, size=size)
    square, _non_square = default_inputs(size)
    return Exported(spec, state, model, path, options, size, run_reference(spec, state, [square]))


S0_OPTIONS = CoreMLOptions(version="1.2", author="Test Author", license="MIT")


@pytest.fixture(scope="module")
def s0(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """S0 with the default options (fp16, iOS 16, 224 px) and the three free-text fields."""
    return _export_variant(tmp_path_factory.mktemp("s0"), "s0", S0_OPTIONS)


@pytest.fixture(scope="module")
def s0_fp32(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    options = CoreMLOptions(precision="fp32")
    return _export_variant(tmp_path_factory.mktemp("s0-fp32"), "s0", options, SMALL_SIZE)


@pytest.fixture(scope="module")
def s4(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """S4: squeeze-excite in the last 5 block pairs of stage 3 and the one of stage 4."""
    return _export_variant(tmp_path_factory.mktemp("s4"), "s4", CoreMLOptions(), SMALL_SIZE)


@pytest.fixture(scope="module")
def s4_fp32(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    options = CoreMLOptions(precision="fp32")
    return _export_variant(tmp_path_factory.mktemp("s4-fp32"), "s4", options, SMALL_SIZE)


def expected_op_counts(spec: ArchitectureSpec, *, precision: str) -> dict[str, int]:
    """The minimal program of a folded spec, derived from its blocks.

    Each block is one conv + relu; a squeeze-excite adds reduce_mean, two convs,
    a relu, a sigmoid and a mul; a classifier adds the global reduce_mean and a
    linear. An fp16 program casts its fp32 input to fp16 and its output back.
    Anything else (batch_norm, avg_pool, reshape...) is a defect.
    """
    blocks = len(spec.blocks)
    squeeze_excites = sum(block.se_channels > 0 for block in spec.blocks)
    classifier = int(spec.num_classes is not None)
    counts = {
        "conv": blocks + 2 * squeeze_excites,
        "relu": blocks + squeeze_excites,
        "reduce_mean": squeeze_excites + classifier,
        "sigmoid": squeeze_excites,
        "mul": squeeze_excites,
        "linear": classifier,
        "cast": 2 if precision == "fp16" else 0,
    }
    return {op: count for op, count in sorted(counts.items()) if count}


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


# --- Whole variants: program and proof -----------------------------------------------------

PACKAGES = ["s0", "s0_fp32", "s4", "s4_fp32"]


@pytest.mark.parametrize("name", PACKAGES)
def test_program_is_one_conv_per_block(name: str, request: pytest.FixtureRequest) -> None:
    exported: Exported = request.getfixturevalue(name)
    counts = op_counts(exported.path)
    assert counts == expected_op_counts(exported.spec.folded(), precision=exported.options.precision)
    assert "batch_norm" not in counts and "avg_pool" not in counts  # spelled out: the point


def test_expected_counts_cover_both_kinds_of_block() -> None:
    # Guard against the S0 and S4 cases above testing the same thing.
    assert "sigmoid" not in expected_op_counts(spec_of("s0"), precision="fp32")
    pairs = sum(VARIANTS["s4"].se_blocks)  # (depthwise, pointwise) pairs with squeeze-excite
    assert expected_op_counts(spec_of("s4"), precision="fp32")["sigmoid"] == 2 * pairs > 0


@pytest.mark.parametrize("name", ["s0_fp32", "s4_fp32"])
def test_fp32_package_passes_the_fp32_tolerance(name: str, request: pytest.FixtureRequest) -> None:
    exported: Exported = request.getfixturevalue(name)
    verification, cost = prove(exported)
    assert verification.passed, verification
    assert verification.top1_agreement == 1.0 and cost is None
    assert verification.reference == "train-time fp32"


@pytest.mark.parametrize("name", ["s0", "s4"])
def test_fp16_package_is_proven_tightly_and_its_cost_measured(
    name: str, request: pytest.FixtureRequest
) -> None:
    exported: Exported = request.getfixturevalue(name)
    verification, cost = prove(exported)
    # The conversion proof: the package's own ops and fp16 weights with float32 arithmetic
    # against the folded model with its weights rounded alike, under the fp32 rule.
    assert verification.passed, verification
    assert verification.reference == "folded model with float16 weights"
    assert verification.rtol <= 1e-3 and verification.tolerance_rule.startswith("max(0.0001")
    # fp16 arithmetic really happened (a silent fp32 program would sit at the fp32 floor):
    # the cost, measured in the package's own arithmetic against the fp32 model, is far larger.
    assert cost is not None and cost.precision == "fp16"
    assert cost.max_rel_diff > 100 * exported.reference.noise_floor
    assert -1 <= cost.worst_cosine <= cost.mean_cosine <= 1
    assert cost.top1_agreement is not None and cost.top5_agreement is not None
    assert cost.top5_agreement >= cost.top1_agreement
    assert not compare(exported.reference, candidate(exported.path), rtol=None).passed


def test_the_cost_gates_fail_a_costly_precision(s4: Exported) -> None:
    _, cost = prove(s4, gates=Gates(min_cosine=1.0, min_agreement=0))
    assert cost is not None and not cost.passed  # no fp16 package reaches cosine 1 exactly
    _, lenient = prove(s4, gates=Gates(min_cosine=-1, min_agreement=0))
    assert lenient is not None and lenient.passed


def test_fp16_package_keeps_fp32_inputs_and_outputs(s0: Exported) -> None:
    summary = summarize_program(s0.path)
    assert summary.inputs == (("image", "fp32", (1, 3, 224, 224)),)
    assert summary.outputs == ("logits",)
    assert summary.op_counts["cast"] == 2  # fp32 -> fp16 after the input, back before the output
    output = run_program(s0.path, {"image": np.zeros((1, 3, 224, 224), np.float32)})["logits"]
    assert (output.dtype, output.shape) == (np.float32, (1, 1000))


def test_package_describes_itself(s0: Exported) -> None:
    spec = load_spec(s0.path)
    assert spec.specificationVersion == 7  # iOS 16
    metadata = spec.description.metadata
    assert metadata.shortDescription == f"MobileOne S0 folded by mobileone {__version__}"
    assert (metadata.versionString, metadata.author, metadata.license) == ("1.2", "Test Author",
                                                                           "MIT")
    # Exactly the caller's metadata: coremltools' own keys name host-dependent versions.
    assert dict(metadata.userDefined) == _metadata("s0", 224)
    (image,) = spec.description.input
    assert image.shortDescription == (
        "RGB image, 1 x 3 x 224 x 224 float32, normalised: (pixel / 255 - mean) / std "
        "with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)")
    (logits,) = spec.description.output
    assert (logits.name, logits.shortDescription) == ("logits", "Class logits (before softmax)")


@pytest.mark.parametrize(("name", "precision"), [("s0", "fp16"), ("s4_fp32", "fp32")])
def test_describe_reads_what_the_package_is(
    name: str, precision: str, request: pytest.FixtureRequest
) -> None:
    exported: Exported = request.getfixturevalue(name)
    size = exported.size
    assert describe(exported.path) == PackageDescription(
        input_shape=(1, 3, size, size), image_input=False, precision=precision,
        is_classifier=False, output="logits", outputs=("logits",), deployment_target="CoreML6",
    )


def test_candidate_refuses_another_size_by_name(s0: Exported) -> None:
    _square, non_square = default_inputs(224)
    with pytest.raises(ValueError, match=r"takes input of shape 1 x 3 x 224 x 224; "
                                         r"got 1 x 3 x 192 x 256"):
        candidate(s0.path)(non_square.array)


# --- Tampering -----------------------------------------------------------------------------

BLOB_SENTINEL = 0xDEADBEEF
MIL_FP16 = 1  # the blob header's dtype code


def _conv_weight_regions(package: Path) -> list[tuple[str, int, int]]:
    """(const name, data offset, size in bytes) of each conv's weight, in program order.

    Each op's weight is a const whose blobFileValue.offset points at a 64-byte blob
    header in weight.bin: sentinel, dtype, data size, data offset (little endian).
    """
    spec = load_spec(package)
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    blobs = {
        op.outputs[0].name: op.attributes["val"].blobFileValue.offset
        for op in operations
        if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue"
    }
    data = (package / WEIGHTS).read_bytes()
    regions = []
    for op in operations:
        if op.type == "conv":
            name = op.inputs["weight"].arguments[0].name
            sentinel, dtype, size, offset = struct.unpack_from("<IIQQ", data, blobs[name])
            assert (sentinel, dtype) == (BLOB_SENTINEL, MIL_FP16)
            regions.append((name, offset, size))
    return regions


def _tamper(package: Path, folder: Path, region: int, flip: Any) -> Path:
    tampered = folder / f"tampered-{region}.mlpackage"
    shutil.copytree(package, tampered)
    data = bytearray((tampered / WEIGHTS).read_bytes())
    flip(data, *_conv_weight_regions(tampered)[region][1:])
    (tampered / WEIGHTS).write_bytes(bytes(data))
    return tampered


def test_flipped_conv_weight_bytes_fail_verification(s0: Exported, tmp_path: Path) -> None:
    name, offset, size = _conv_weight_regions(s0.path)[0]
    data = (s0.path / WEIGHTS).read_bytes()
    # The region really is the stem's kernel (std is not folded in: a tensor-input package).
    stem = s0.model.state_dict()[STEM_WEIGHT].half().numpy()
    assert (name, size) == ("stage0_reparam_conv_weight_to_fp16", stem.nbytes)
    assert data[offset : offset + size] == stem.tobytes()

    def flip_signs(data: bytearray, offset: int, size: int) -> None:
        for index in range(3):  # the sign bit (high byte, little endian) of three weights
            data[offset + 2 * index + 1] ^= 0x80

    verification, _ = prove(s0, _tamper(s0.path, tmp_path, 0, flip_signs))
    assert not verification.passed
    assert verification.max_rel_diff > 10 * verification.rtol


def test_reversed_rows_of_the_last_conv_fail_an_fp16_s4(s4: Exported, tmp_path: Path) -> None:
    """fp16 S4 has the largest cost of precision; a tamper still fails its conversion proof."""
    def reverse_output_channels(data: bytearray, offset: int, size: int) -> None:
        kernel = np.frombuffer(bytes(data[offset : offset + size]), dtype=np.float16)
        rows = kernel.reshape(s4.spec.folded().stages[-1][-1].out_channels, -1)
        data[offset : offset + size] = rows[::-1].tobytes()

    verification, cost = prove(s4, _tamper(s4.path, tmp_path, -1, reverse_output_channels))
    assert not verification.passed
    assert verification.max_rel_diff > 10 * verification.rtol
    assert cost is not None


# --- Cross-check of the evaluator ----------------------------------------------------------


def test_evaluator_agrees_with_onnxruntime(s0_fp32: Exported, tmp_path: Path) -> None:
    """The numpy evaluator and onnxruntime, on the same fp32 model and input.

    They cannot agree to 1e-5 on this model: each is an fp32 evaluation that sums
    in its own order, and each lands 1-2e-5 (of the logit scale) from the float64
    folded model, as fp32 torch does (measured: Core ML evaluator vs onnxruntime
    3.3e-5 at 96 px, 1.6e-5 at 224). So the check is that the evaluator is as
    close to the exact result as onnxruntime is, and both agree within 1e-4.
    """
    onnx_path = tmp_path / "s0.onnx"
    onnx_export.export(s0_fp32.model, onnx_path, metadata={}, options=OnnxOptions(),
                       input_size=SMALL_SIZE)
    (square,) = s0_fp32.reference.batches
    from_coreml = candidate(s0_fp32.path)(square.array)
    from_onnxruntime = onnx_export.open(onnx_path).run(square.array)
    exact_model = build_model(s0_fp32.spec.folded(),
                              fold_state(s0_fp32.spec, s0_fp32.state, dtype=torch.float64),
                              dtype=torch.float64)
    exact = torch_candidate(exact_model)(square.array.astype(np.float64))
    assert _relative_error(from_coreml, from_onnxruntime) < DEFAULT_RTOL
    assert _relative_error(from_coreml, exact) < 2 * _relative_error(from_onnxruntime, exact)


# --- Image input ---------------------------------------------------------------------------


def test_folding_std_into_the_stem_is_exact_and_leaves_the_model_alone(s0_fp32: Exported) -> None:
    # In float64, so that "exact" is not blurred by fp32 rounding (1e-5 on this model).
    spec = s0_fp32.spec
    model = build_model(spec.folded(), fold_state(spec, s0_fp32.state, dtype=torch.float64),
                        dtype=torch.float64)
    before = model.state_dict()[STEM_WEIGHT].clone()
    folded = fold_std_into_stem(model, STD)
    assert torch.equal(model.state_dict()[STEM_WEIGHT], before)
    (square,) = s0_fp32.reference.batches
    normalised = square.array.astype(np.float64)
    scaled = normalised * np.asarray(STD, np.float64).reshape(1, 3, 1, 1)  # = pixels/255 - mean
    expected = torch_candidate(model)(normalised)
    assert _relative_error(torch_candidate(folded)(scaled), expected) < 1e-12


def _convert_with_averaged_std(model: MobileOne, path: Path, size: int) -> Path:
    """The recipe often seen: one scale 1/(255 * mean(std)), bias -mean/std, model untouched."""
    with quiet_coremltools():
        import coremltools as ct

        mlmodel = ct.convert(
            torch.jit.trace(model, torch.zeros(1, 3, size, size)),
            inputs=[ct.ImageType(name="image", shape=(1, 3, size, size),
                                 scale=1 / (255 * float(np.mean(STD))),
                                 bias=[-m / s for m, s in zip(MEAN, STD, strict=True)],
                                 color_layout=ct.colorlayout.RGB)],
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            compute_precision=ct.precision.FLOAT32,
        )
        mlmodel.save(str(path))
    return path


def test_image_input_is_exact_where_the_averaged_std_recipe_is_not(
    s0_fp32: Exported, tmp_path: Path
) -> None:
    options = CoreMLOptions(precision="fp32", image_input=True)
    ours = tmp_path / "image.mlpackage"
    export(s0_fp32.model, ours, metadata={}, options=options, size=SMALL_SIZE)
    (image,) = load_spec(ours).description.input
    assert image.type.WhichOneof("Type") == "imageType"
    assert image.type.imageType.colorSpace == image.type.imageType.RGB
    assert summarize_program(ours).op_counts == {
        **expected_op_counts(s0_fp32.spec, precision="fp32"), "add": 1, "mul": 1,  # 1/255, -mean
    }
    verification = compare(s0_fp32.reference, candidate(ours), rtol=None)
    assert verification.passed, verification

    averaged = _convert_with_averaged_std(s0_fp32.model, tmp_path / "averaged.mlpackage",
                                          SMALL_SIZE)
    wrong = compare(s0_fp32.reference, candidate(averaged), rtol=None)
    # Measured: 0.28 of the logit scale at 96 and at 224 px (ours: 4.4e-5 and 1.9e-5, the
    # fp32 floor); at 224 px neither noise image keeps its top-1 class.
    assert wrong.max_rel_diff > 1e-2 > 100 * verification.max_rel_diff


# --- Classifier ----------------------------------------------------------------------------

LABELS = tuple(f"class {index}" for index in range(1000))


def _class_labels(spec: Any) -> list[str]:
    """The labels an ML Program classifier keeps: an immediate list in its classify op."""
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    (classify,) = [op for op in operations if op.type == "classify"]
    (classes,) = classify.inputs["classes"].arguments
    return [str(item.immediateValue.tensor.strings.values[0])
            for item in classes.value.immediateValue.list.values]


def test_image_classifier_outputs_probabilities(s0_fp32: Exported, tmp_path: Path) -> None:
    """What an app ships: camera pixels in, label and probabilities out, fp16."""
    path = tmp_path / "classifier.mlpackage"
    export(s0_fp32.model, path, metadata={}, labels=LABELS, size=SMALL_SIZE,
           options=CoreMLOptions(image_input=True))
    assert describe(path) == PackageDescription(
        input_shape=(1, 3, SMALL_SIZE, SMALL_SIZE), image_input=True, precision="fp16",
        is_classifier=True, output="classLabel_probs",
        outputs=("classLabel", "classLabel_probs"), deployment_target="CoreML6",
    )
    spec = load_spec(path)
    assert _class_labels(spec) == list(LABELS)
    assert (spec.description.predictedFeatureName,
            spec.description.predictedProbabilitiesName) == ("classLabel", "classLabel_probs")
    summary = summarize_program(path)
    assert summary.outputs == ("classLabel", "classLabel_probs")
    assert summary.op_counts["softmax"] == summary.op_counts["classify"] == 1

    (square,) = s0_fp32.reference.batches
    probabilities = candidate(path)(square.array)
    assert probabilities.shape == (2, 1000)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)  # probabilities, not logits
    pixels = (square.array[:1] * np.reshape(STD, (1, 3, 1, 1)) + np.reshape(MEAN, (1, 3, 1, 1)))
    top = run_program(path, {"image": (pixels * 255).astype(np.float32)})["classLabel"]
    assert int(top) == int(probabilities[0].argmax())

    # Image input, softmax and fp16 together, still proven at the fp32 rule.
    verification, cost = prove(s0_fp32, path)
    assert verification.passed, verification
    assert verification.top1_agreement == 1.0 and cost is not None


def test_softmax_reference_keeps_each_precision(s0_fp32: Exported) -> None:
    reference = s0_fp32.reference.softmaxed()
    (fp32,), (fp64,) = reference.outputs_fp32, reference.outputs_fp64
    assert (fp32.dtype, fp64.dtype) == (np.float32, np.float64)
    assert np.abs(fp64.sum(axis=1) - 1).max() < 1e-12
    assert reference.batches == s0_fp32.reference.batches and reference.is_classifier


def test_label_count_must_match_the_classes(s0_fp32: Exported, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as raised:
        export(s0_fp32.model, tmp_path / "x.mlpackage", metadata={}, options=CoreMLOptions(),
               labels=("cat", "dog", "fox"), size=32)
    assert raised.value.message == "labels file has 3 labels, the model has 1000 classes"
    assert not (tmp_path / "x.mlpackage").exists()


# --- Options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (CoreMLOptions(target="iOS99"), "unknown deployment target 'iOS99'"),
        (CoreMLOptions(target="iOS14"), "deployment target iOS14 is too old for an ML Program"),
        (CoreMLOptions(precision="int8"), "unknown precision 'int8'"),
    ],
)
def test_bad_options_are_usage_errors(
    s0_fp32: Exported, tmp_path: Path, options: CoreMLOptions, message: str
) -> None:
    with pytest.raises(UsageError) as raised:
        export(s0_fp32.model, tmp_path / "x.mlpackage", metadata={}, options=options, size=32)
    assert raised.value.message == message
    assert raised.value.hint


def test_package_path_must_end_in_mlpackage(s0_fp32: Exported, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"a Core ML package is a folder ending in \.mlpackage"):
        export(s0_fp32.model, tmp_path / "model.mlmodel", metadata={}, options=CoreMLOptions(),
               size=32)


def _folded_block(in_channels: int, out_channels: int, *, kernel_size: int, stride: int,
                  groups: int, se_channels: int = 0) -> BlockSpec:
    return BlockSpec(in_channels, out_channels, kernel_size, stride, groups, conv_branches=0,
                     has_scale=False, has_identity=False, se_channels=se_channels)


def test_headless_model_exports_its_feature_map(tmp_path: Path) -> None:
    stage = (_folded_block(8, 8, kernel_size=3, stride=2, groups=8, se_channels=2),
             _folded_block(8, 16, kernel_size=1, stride=1, groups=1))
    spec = ArchitectureSpec(stem=_folded_block(3, 8, kernel_size=3, stride=2, groups=1),
                            stages=(stage,), num_classes=None)
    torch.manual_seed(0)
    model = build_model(spec)
    with pytest.raises(UsageError, match="labels need a classifier"):
        export(model, tmp_path / "x.mlpackage", metadata={}, labels=("a",), size=32,
               options=CoreMLOptions())
    path = tmp_path / "features.mlpackage"
    options = CoreMLOptions(precision="fp32", target="macOS13", description="A tiny backbone")
    export(model, path, metadata={}, output_name="features", options=options, size=32)
    assert op_counts(path) == expected_op_counts(spec, precision="fp32")
    package = load_spec(path)
    assert package.specificationVersion == 7  # macOS 13 = iOS 16
    assert package.description.metadata.shortDescription == "A tiny backbone"
    (output,) = package.description.output
    assert output.name == "features" and output.shortDescription.startswith("Feature map")
    image = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    actual = candidate(path)(image)
    assert actual.shape == (2, 16, 8, 8)
    assert _relative_error(actual, torch_candidate(model)(image)) < 1e-5


# --- Quiet and reproducible ----------------------------------------------------------------


def _package_files(package: Path) -> dict[str, bytes]:
    return {str(file.relative_to(package)): file.read_bytes()
            for file in sorted(package.rglob("*")) if file.is_file()}


def test_export_is_silent_and_byte_identical_in_process(
    s0: Exported, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    again = tmp_path / "again.mlpackage"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(s0.model, again, metadata=_metadata("s0", 224), options=S0_OPTIONS, size=224)
    assert [str(warning.message) for warning in caught] == []
    assert capfd.readouterr() == ("", "")
    files = _package_files(again)
    assert sorted(files) == ["Data/com.apple.CoreML/model.mlmodel",
                             "Data/com.apple.CoreML/weights/weight.bin", "Manifest.json"]
    assert files == _package_files(s0.path)


SUBPROCESS_EXPORT = """
import sys
from pathlib import Path
from fixtures.generate import canonical_state, spec_of
from mobileone_cli.fold import fold_state
from mobileone_cli.model import build_model
from tests.test_export_coreml import S0_OPTIONS, _metadata, export

spec = spec_of("s0")
model = build_model(spec.folded(), fold_state(spec, canonical_state("s0")))
print("EXPORT", flush=True)
print("EXPORT", file=sys.stderr, flush=True)
export(model, Path(sys.argv[1]), metadata=_metadata("s0", 224), options=S0_OPTIONS, size=224)
"""


def test_export_is_silent_and_byte_identical_across_processes(s0: Exported, tmp_path: Path) -> None:
    # Another hash seed: protobuf maps serialise in hash order unless told to sort.
    other = tmp_path / "other.mlpackage"
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-W", "always", "-c", SUBPROCESS_EXPORT, str(other)],
        cwd=ROOT, env=environment, capture_output=True, text=True, check=True,
    )
    # Whatever the imports say, the export itself (the first in that process) prints nothing:
    # not coremltools' import-time log lines, not its progress bars.
    assert completed.stdout.split("EXPORT\n", 1)[1] == ""
    assert completed.stderr.split("EXPORT\n", 1)[1] == ""
    assert _package_files(other) == _package_files(s0.path)

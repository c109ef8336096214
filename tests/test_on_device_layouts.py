"""Every layout on every on-device target (ExecuTorch `.pte`, LiteRT `.tflite`, ORT `.ort`).

Exporting the 15 MobileOne layout x variant pairs and the other layouts to all
three targets would cost minutes of CPU (about 8 s a model to ExecuTorch and 7 s
to LiteRT at 64 px), and most of it would repeat itself. So coverage is in three
parts:

1. Apple, timm and mmpretrain name the same tensors (a key permutation, see
   `layouts.py`): for every variant, the three checkpoints of one seed load to
   the same spec and bit-identical canonical and folded states, and the only
   write input that differs is two metadata strings (the layout and the source's
   sha256). The export pipeline builds every other part of the backend's
   `WriteContext` from the spec and the options, and its model from the folded
   state. timm's and THU-MIG's RepViT layouts are each other's permutation and
   are checked the same way.
2. Byte identity for real: Apple's folded S0, written with the context the timm
   S0 run used, gives the timm run's files byte for byte, on each target.
3. Real exports through the public API (`api.export`, one bundle of the three
   targets a checkpoint, at 64 px: 2 x 2 pixels at the last stage, so every
   3x3 tap is exercised), each proven by the pipeline in its own runtime: S0-S4
   in alternating permuted layouts (so each variant and each of timm and
   mmpretrain reaches every target; tests/test_export_*.py and test_bundle.py
   export Apple's S0 and S4), and once each the models that are not a
   permutation of Apple's: shoutOutYangJie's S0 and RepViT m0_9 (in THU-MIG's
   layout; timm's is its permutation, part 1), whose bundles are re-proven from
   their manifests too (`verify --manifest`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mobileone_cli import api
from mobileone_cli.checkpoint import LoadedCheckpoint, load_checkpoint
from mobileone_cli.export.backend import WriteContext
from mobileone_cli.export.pipeline import file_metadata, fold_and_prove
from mobileone_cli.export.registry import get_backend
from mobileone_cli.fold import fold_state
from mobileone_cli.layouts import LAYOUTS
from mobileone_cli.options import ExportOptions, LiteRTOptions, OnnxOptions
from mobileone_cli.proof.inputs import IMAGENET_MEAN, IMAGENET_STD
from mobileone_cli.results import ExportResult, Verification
from mobileone_cli.variants import VARIANTS
from tests.on_device import SIZE

TARGETS = ("executorch", "tflite", "ort")
PERMUTED_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "apple")
# Each variant once, in a layout of Apple's permutations, alternating.
PERMUTED_CASES = tuple((variant, PERMUTED_LAYOUTS[index % len(PERMUTED_LAYOUTS)])
                       for index, variant in enumerate(sorted(VARIANTS)))
OTHER_CASES = (("s0", "yangjie"), ("m0_9", "thumig"))
CASES = PERMUTED_CASES + OTHER_CASES
IDENTITY_CASE = ("s0", "timm")
# The metadata keys that name the source; nothing else written differs between layouts.
SOURCE_KEYS = {"mobileone.layout", "mobileone.source_sha256"}
# Fold figures for the metadata comparison: equal states give equal figures, so any will do.
FIGURES = Verification(max_abs_diff=1e-6, max_rel_diff=1e-6, cosine_similarity=1.0,
                       top1_agreement=1.0, noise_floor=1e-6, floor_ratio=1.0, rtol=1e-4,
                       tolerance_rule="the default rule", inputs=("random",))
# What the pipeline hands each backend as its options when the run sets none.
DEFAULT_OPTIONS = {"executorch": None, "tflite": LiteRTOptions(), "ort": OnnxOptions()}


def missing(target: str) -> str | None:
    return get_backend(target).missing()


@pytest.fixture(scope="module")
def exported(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[tuple[str, str], ExportResult]:
    """One bundle of every installed target per case, written through `api.export`."""
    if all(missing(target) for target in TARGETS):
        pytest.skip("; ".join(str(missing(target)) for target in TARGETS))
    folder = tmp_path_factory.mktemp("layouts")
    return {
        (variant, layout): api.export(ExportOptions(
            source=make_checkpoint(variant, layout), targets=TARGETS, input_size=SIZE,
            output=folder / f"{layout}_{variant}"))
        for variant, layout in CASES
    }


def _load(make_checkpoint: Callable[..., Path], variant: str, layout: str) -> LoadedCheckpoint:
    loaded = load_checkpoint(make_checkpoint(variant, layout))
    assert (loaded.layout, loaded.variant) == (layout, variant)
    return loaded


def _assert_same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert list(first) == list(second)
    for key, value in first.items():
        assert value.dtype == second[key].dtype and torch.equal(value, second[key]), key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_permuted_layouts_load_and_fold_to_apples_model(make_checkpoint: Callable[..., Path],
                                                        variant: str) -> None:
    apple = _load(make_checkpoint, variant, "apple")
    apple_folded = fold_state(apple.spec, apple.state)
    apple_metadata = file_metadata(apple, layout="apple", input_size=SIZE, verification=FIGURES)
    for layout in PERMUTED_LAYOUTS:
        other = _load(make_checkpoint, variant, layout)
        assert other.spec == apple.spec
        _assert_same_tensors(other.state, apple.state)
        _assert_same_tensors(fold_state(other.spec, other.state), apple_folded)
        metadata = file_metadata(other, layout=layout, input_size=SIZE, verification=FIGURES)
        differing = {key for key in metadata if metadata[key] != apple_metadata[key]}
        assert set(metadata) == set(apple_metadata) and differing == SOURCE_KEYS


def test_repvit_layouts_load_and_fold_to_one_model(make_checkpoint: Callable[..., Path]) -> None:
    timm = _load(make_checkpoint, "m0_9", "timm")
    thumig = _load(make_checkpoint, "m0_9", "thumig")
    assert thumig.spec == timm.spec
    _assert_same_tensors(thumig.state, timm.state)
    _assert_same_tensors(fold_state(thumig.spec, thumig.state), fold_state(timm.spec, timm.state))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("variant", "layout"), CASES)
def test_every_layout_is_proven_in_each_runtime(exported: dict[tuple[str, str], ExportResult],
                                                variant: str, layout: str, target: str) -> None:
    if missing(target):
        pytest.skip(missing(target) or "")
    result = exported[(variant, layout)]
    assert result.passed and result.written, result.to_dict()
    assert (result.summary.variant, result.summary.layout) == (variant, layout)
    [artifact] = [artifact for artifact in result.artifacts if artifact.format == target]
    verification = artifact.verification
    assert verification is not None and verification.passed, verification
    assert verification.max_rel_diff <= verification.rtol
    assert verification.top1_agreement == 1.0
    assert artifact.path.is_file()
    assert artifact.declared is not None
    details = artifact.declared.details
    written = details["metadata"]
    assert (written["mobileone.variant"], written["mobileone.layout"]) == (variant, layout)
    if target == "executorch":  # every family: all but the head's mean runs in XNNPACK
        assert details["portable_operators"] == ["aten::mean.out"]


@pytest.mark.parametrize(("variant", "layout"), OTHER_CASES)
def test_bundles_of_the_other_layouts_are_proven_again_from_the_manifest(
        exported: dict[tuple[str, str], ExportResult], make_checkpoint: Callable[..., Path],
        variant: str, layout: str) -> None:
    result = exported[(variant, layout)]
    assert result.bundle is not None
    check = api.verify_bundle(result.bundle / "manifest.json",
                              against=make_checkpoint(variant, layout))
    assert check.passed, check.to_dict()
    proven = {Path(verification.artifact.path).suffix for verification in check.verifications}
    assert proven >= {get_backend(target).suffix for target in TARGETS if not missing(target)}


@pytest.mark.parametrize("target", TARGETS)
def test_apples_model_writes_the_permuted_layouts_bytes(
        exported: dict[tuple[str, str], ExportResult], make_checkpoint: Callable[..., Path],
        tmp_path: Path, target: str) -> None:
    """What the timm run wrote is what Apple's folded model gives with the timm run's context."""
    if missing(target):
        pytest.skip(missing(target) or "")
    variant, layout = IDENTITY_CASE
    result = exported[IDENTITY_CASE]
    [artifact] = [artifact for artifact in result.artifacts if artifact.format == target]
    apple = fold_and_prove(_load(make_checkpoint, variant, "apple"), input_size=SIZE)
    context = WriteContext(
        input_size=SIZE, output_name="logits",
        metadata=file_metadata(_load(make_checkpoint, variant, layout), layout=layout,
                               input_size=SIZE, verification=result.fold_verification),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, options=DEFAULT_OPTIONS[target])
    backend = get_backend(target)
    path = tmp_path / artifact.path.name  # the ORT config's header names the file
    backend.write(apple.build(), path, context=context)
    assert path.read_bytes() == artifact.path.read_bytes()
    companions = [companion.path.read_bytes() for companion in artifact.companions]
    assert [companion.read_bytes() for companion in backend.companions(path)] == companions

"""The ONNX exporter: minimal graph, mobile-loadable, reproducible, and verified like the fold.

Whole variants where the variant matters (S0 without squeeze-excite at 224 once,
S4 with it at 96 px); a tiny purpose-built model for the options and edge cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from fixtures.generate import canonical_state, spec_of
from mobileone_cli import __version__
from mobileone_cli.errors import EXIT_EXPORT_FAILED, ExportFailedError
from mobileone_cli.export import onnx as onnx_backend
from mobileone_cli.export.onnx import op_counts
from mobileone_cli.fold import fold_state
from mobileone_cli.model import MobileOne, build_model
from mobileone_cli.options import OnnxOptions
from mobileone_cli.proof.compare import DEFAULT_RTOL, compare
from mobileone_cli.proof.compare import torch_runner as torch_candidate
from mobileone_cli.proof.inputs import IMAGENET_MEAN, IMAGENET_STD, default_inputs
from mobileone_cli.proof.reference import ReferenceRun, run_reference
from mobileone_cli.variants import VARIANTS, ArchitectureSpec, BlockSpec

ROOT = Path(__file__).resolve().parent.parent
# S4's graph does not depend on the input size, but its fp32 noise floor does: at 64 px the
# folded torch S4 itself lands at 1.8e-4 (floor 1.1e-4), at 96 px at 2.4e-5 (floor 1.6e-5).
SMALL_SIZE = 96


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """On a shared 2-core machine, torch's OpenMP threads spin-waiting for a preempted
    sibling made this file 5-10x slower (S0's reference run: 0.7 s alone, 11 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def export(model: torch.nn.Module, path: Path, *, metadata: dict[str, str], options: OnnxOptions,
           size: int = 224, output_name: str = "logits") -> None:
    onnx_backend.export(model, path, metadata=metadata, options=options, input_size=size,
                        output_name=output_name)


def candidate(path: Path) -> Any:
    """The file in onnxruntime, as the pipeline opens it."""
    return onnx_backend.open(path).run


def _metadata(variant: str, size: int) -> dict[str, str]:
    """What the caller writes, deliberately not in key order."""
    return {
        "mobileone.variant": variant,
        "mobileone.layout": "apple",
        "mobileone.mean": json.dumps(IMAGENET_MEAN),
        "mobileone.std": json.dumps(IMAGENET_STD),
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
    options: OnnxOptions
    size: int


def _export_variant(folder: Path, variant: str, options: OnnxOptions,
                    num_classes: int | None = 1000, size: int = 224) -> Exported:
    spec = spec_of(variant, num_classes=num_classes)
    state = canonical_state(variant, num_classes=num_classes)
    model = build_model(spec.folded(), fold_state(spec, state))
    path = folder / f"{variant}.onnx"
    export(model, path, metadata=_metadata(variant, size), options=options, size=size,
           output_name="logits" if num_classes else "features")
    return Exported(spec, state, model, path, options, size)


@pytest.fixture(scope="module")
def s0(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """S0 with the default options: static 1 x 3 x 224 x 224."""
    return _export_variant(tmp_path_factory.mktemp("s0"), "s0", OnnxOptions())


@pytest.fixture(scope="module")
def s4(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """S4 (squeeze-excite in stages 3 and 4) with symbolic batch, height and width."""
    options = OnnxOptions(dynamic_batch=True, dynamic_size=True)
    return _export_variant(tmp_path_factory.mktemp("s4"), "s4", options, size=SMALL_SIZE)


@pytest.fixture(scope="module")
def s0_reference(s0: Exported) -> ReferenceRun:
    """The square batch only: a static export cannot take the non-square one (see test below)."""
    square, _non_square = default_inputs(224)
    return run_reference(s0.spec, s0.state, [square])


def expected_op_counts(spec: ArchitectureSpec) -> dict[str, int]:
    """The minimal graph of a folded spec, derived from its blocks.

    Each block is one Conv + Relu; a squeeze-excite adds ReduceMean, two Convs,
    a Relu, a Sigmoid and a Mul; a classifier adds the global ReduceMean and Gemm.
    Anything else (BatchNormalization, Identity, AveragePool, Reshape...) is a defect.
    """
    blocks = len(spec.blocks)
    squeeze_excites = sum(block.se_channels > 0 for block in spec.blocks)
    classifier = int(spec.num_classes is not None)
    counts = {
        "Conv": blocks + 2 * squeeze_excites,
        "Relu": blocks + squeeze_excites,
        "ReduceMean": squeeze_excites + classifier,
        "Sigmoid": squeeze_excites,
        "Mul": squeeze_excites,
        "Gemm": classifier,
    }
    return {op: count for op, count in sorted(counts.items()) if count}


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


# Whole variants: graph, file, proof


@pytest.mark.parametrize("name", ["s0", "s4"])
def test_graph_is_one_conv_per_block(name: str, request: pytest.FixtureRequest) -> None:
    exported: Exported = request.getfixturevalue(name)
    counts = op_counts(exported.path)
    assert not {"BatchNormalization", "Identity", "AveragePool", "Reshape"} & counts.keys()
    assert counts == expected_op_counts(exported.spec.folded())


def test_expected_counts_cover_both_kinds_of_block(s0: Exported, s4: Exported) -> None:
    # Guard against the two parametrised cases above testing the same thing.
    assert "Sigmoid" not in expected_op_counts(s0.spec)
    pairs = sum(VARIANTS["s4"].se_blocks)  # (depthwise, pointwise) pairs with squeeze-excite
    assert expected_op_counts(s4.spec)["Sigmoid"] == 2 * pairs > 0


@pytest.mark.parametrize("name", ["s0", "s4"])
def test_file_is_self_contained_opset_17_ir_8(name: str, request: pytest.FixtureRequest) -> None:
    exported: Exported = request.getfixturevalue(name)
    assert [p.name for p in exported.path.parent.iterdir()] == [exported.path.name]
    proto = onnx.load(str(exported.path), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert proto.ir_version == 8
    onnx.checker.check_model(proto, full_check=True)
    candidate(exported.path)  # onnxruntime loads it


def test_file_describes_itself_and_nothing_else(s0: Exported) -> None:
    proto = onnx.load(str(s0.path))
    metadata = _metadata("s0", 224)
    assert [(p.key, p.value) for p in proto.metadata_props] == sorted(metadata.items())
    assert (proto.producer_name, proto.producer_version) == ("mobileone", __version__)
    assert not proto.HasField("doc_string")
    assert not any(node.HasField("doc_string") for node in proto.graph.node)


def test_static_export_has_fixed_names_and_shapes(s0: Exported) -> None:
    graph = onnx.load(str(s0.path)).graph
    assert [(v.name, _dims(v)) for v in graph.input] == [("image", [1, 3, 224, 224])]
    assert [(v.name, _dims(v)) for v in graph.output] == [("logits", [1, 1000])]


def test_dynamic_export_names_its_symbolic_axes(s4: Exported) -> None:
    graph = onnx.load(str(s4.path)).graph
    assert [(v.name, _dims(v)) for v in graph.input] == [("image", ["batch", 3, "height", "width"])]
    assert [(v.name, _dims(v)) for v in graph.output] == [("logits", ["batch", 1000])]


def test_s0_static_export_passes_verification(s0: Exported, s0_reference: ReferenceRun) -> None:
    verification = compare(s0_reference, candidate(s0.path), rtol=DEFAULT_RTOL)
    assert verification.passed, verification
    assert verification.top1_agreement == 1.0


def test_s4_dynamic_export_passes_verification_on_every_default_input(s4: Exported) -> None:
    reference = run_reference(s4.spec, s4.state, default_inputs(SMALL_SIZE))
    verification = compare(reference, candidate(s4.path), rtol=DEFAULT_RTOL)
    assert verification.passed, verification
    assert len(verification.inputs) == 2  # the non-square batch ran too


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_runs_any_batch(s4: Exported, batch: int) -> None:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, SMALL_SIZE, SMALL_SIZE, generator=generator)
    actual = candidate(s4.path)(image.numpy())
    expected = torch_candidate(s4.model)(image.numpy())
    assert actual.shape == (batch, 1000)
    assert _relative_error(actual, expected) <= DEFAULT_RTOL


@pytest.mark.parametrize(("height", "width"), [(224, 224), (192, 256)])
def test_dynamic_size_runs_any_size(s4: Exported, height: int, width: int) -> None:
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    actual = candidate(s4.path)(image.numpy())
    expected = torch_candidate(s4.model)(image.numpy())
    assert _relative_error(actual, expected) <= DEFAULT_RTOL


def test_static_export_refuses_the_non_square_batch_by_name(s0: Exported) -> None:
    _square, non_square = default_inputs(224)
    message = "takes input of shape 1 x 3 x 224 x 224; got 1 x 3 x 192 x 256"
    with pytest.raises(ValueError, match=message):
        candidate(s0.path)(non_square.array)


def test_tampered_export_fails_verification(
    s0: Exported, s0_reference: ReferenceRun, tmp_path: Path
) -> None:
    proto = onnx.load(str(s0.path))
    first_conv = next(node for node in proto.graph.node if node.op_type == "Conv")
    weight = next(t for t in proto.graph.initializer if t.name == first_conv.input[1])
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.01,
                                                 weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    verification = compare(s0_reference, candidate(tampered), rtol=DEFAULT_RTOL)
    assert not verification.passed
    assert verification.max_rel_diff > 10 * DEFAULT_RTOL


def test_flipped_weight_bytes_fail_verification(
    s0: Exported, s0_reference: ReferenceRun, tmp_path: Path
) -> None:
    data = bytearray(s0.path.read_bytes())
    proto = onnx.load_from_string(bytes(data))
    gemm = next(node for node in proto.graph.node if node.op_type == "Gemm")
    weight = next(t for t in proto.graph.initializer if t.name == gemm.input[1])
    assert len(weight.raw_data) >= 64  # stored as raw bytes, so findable in the file
    offset = bytes(data).index(weight.raw_data[:64])
    data[offset + 3] ^= 0x40  # an exponent bit of the first float
    tampered = tmp_path / "flipped.onnx"
    tampered.write_bytes(bytes(data))
    assert not compare(s0_reference, candidate(tampered), rtol=DEFAULT_RTOL).passed


# Reproducible bytes, silently


def test_export_is_silent_and_byte_identical_in_process(
    s0: Exported, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    again = tmp_path / "again.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(s0.model, again, metadata=_metadata("s0", 224), options=s0.options, size=s0.size)
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr() == ("", "")
    assert again.read_bytes() == s0.path.read_bytes()


SUBPROCESS_EXPORT = """
import sys
from pathlib import Path
from fixtures.generate import canonical_state, spec_of
from mobileone_cli.fold import fold_state
from mobileone_cli.model import build_model
from mobileone_cli.options import OnnxOptions
from tests.test_export_onnx import _metadata, export

spec = spec_of("s0")
model = build_model(spec.folded(), fold_state(spec, canonical_state("s0")))
print("EXPORT", flush=True)
print("EXPORT", file=sys.stderr, flush=True)
export(model, Path(sys.argv[1]), metadata=_metadata("s0", 224), options=OnnxOptions())
"""


def test_export_is_silent_and_byte_identical_across_processes(s0: Exported, tmp_path: Path) -> None:
    # Another hash seed: dict/set iteration order differs, as between two CLI runs.
    other = tmp_path / "other.onnx"
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-W", "always", "-c", SUBPROCESS_EXPORT, str(other)],
        cwd=ROOT, env=environment, capture_output=True, text=True, check=True,
    )
    # Whatever the imports say, the export itself (the first in that process) prints nothing.
    assert completed.stdout.split("EXPORT\n", 1)[1] == ""
    assert completed.stderr.split("EXPORT\n", 1)[1] == ""
    assert other.read_bytes() == s0.path.read_bytes()


# Options and edge cases, on a tiny purpose-built model


def _folded_block(in_channels: int, out_channels: int, *, kernel_size: int, stride: int,
                  groups: int, se_channels: int = 0) -> BlockSpec:
    return BlockSpec(in_channels, out_channels, kernel_size, stride, groups, conv_branches=0,
                     has_scale=False, has_identity=False, se_channels=se_channels)


TINY_SIZE = 32


@pytest.fixture(scope="module", params=[10, None], ids=["classifier", "headless"])
def tiny(request: pytest.FixtureRequest) -> MobileOne:
    """Stem, a depthwise stride-2 block with squeeze-excite, a widening 1x1 block."""
    stage = (_folded_block(8, 8, kernel_size=3, stride=2, groups=8, se_channels=2),
             _folded_block(8, 16, kernel_size=1, stride=1, groups=1))
    spec = ArchitectureSpec(stem=_folded_block(3, 8, kernel_size=3, stride=2, groups=1),
                            stages=(stage,), num_classes=request.param)
    torch.manual_seed(0)
    return build_model(spec)


def _export_tiny(model: MobileOne, path: Path, **options: Any) -> Path:
    output_name = "logits" if model.spec.num_classes else "features"
    export(model, path, metadata={}, output_name=output_name, size=TINY_SIZE,
           options=OnnxOptions(**options))
    return path


def test_unsimplified_export_is_minimal_and_correct(tiny: MobileOne, tmp_path: Path) -> None:
    path = _export_tiny(tiny, tmp_path / "plain.onnx", simplify=False)
    assert op_counts(path) == expected_op_counts(tiny.spec)
    image = np.random.default_rng(0).standard_normal((1, 3, TINY_SIZE, TINY_SIZE), np.float32)
    assert _relative_error(candidate(path)(image), torch_candidate(tiny)(image)) <= DEFAULT_RTOL


def test_headless_dynamic_export_names_the_feature_axes(tiny: MobileOne, tmp_path: Path) -> None:
    path = _export_tiny(tiny, tmp_path / "dynamic.onnx", dynamic_batch=True, dynamic_size=True)
    (output,) = onnx.load(str(path)).graph.output
    if tiny.spec.num_classes is None:
        assert (output.name, _dims(output)) == ("features",
                                                ["batch", 16, "feature_height", "feature_width"])
    else:
        assert (output.name, _dims(output)) == ("logits", ["batch", 10])
    image = np.random.default_rng(0).standard_normal((2, 3, 48, 80), np.float32)
    assert _relative_error(candidate(path)(image), torch_candidate(tiny)(image)) <= DEFAULT_RTOL


def test_static_batch_of_one_runs_a_batch_sample_by_sample(tiny: MobileOne, tmp_path: Path) -> None:
    path = _export_tiny(tiny, tmp_path / "static.onnx")
    image = np.random.default_rng(0).standard_normal((3, 3, TINY_SIZE, TINY_SIZE), np.float32)
    assert _relative_error(candidate(path)(image), torch_candidate(tiny)(image)) <= DEFAULT_RTOL


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((1, 3, 48, 32), np.float32, "takes input of shape 1 x 3 x 32 x 32; got 1 x 3 x 48 x 32"),
        ((1, 1, 32, 32), np.float32, "takes input of shape 1 x 3 x 32 x 32; got 1 x 1 x 32 x 32"),
        ((1, 3, 32, 32), np.float64, "float32 array of shape 1 x 3 x 32 x 32; got float64 1 x 3 x"),
        ((3, 32, 32), np.float32, "float32 array of shape 1 x 3 x 32 x 32; got float32 3 x 32 x"),
    ],
)
def test_candidate_names_the_shape_it_takes(
    tiny: MobileOne, tmp_path: Path, shape: tuple[int, ...], dtype: type, message: str
) -> None:
    run = candidate(_export_tiny(tiny, tmp_path / "static.onnx"))
    with pytest.raises(ValueError, match=message):
        run(np.zeros(shape, dtype))


def test_ir_version_follows_the_opset(tiny: MobileOne, tmp_path: Path) -> None:
    proto = onnx.load(str(_export_tiny(tiny, tmp_path / "opset13.onnx", opset=13)))
    assert ([o.version for o in proto.opset_import], proto.ir_version) == ([13], 7)


def test_failed_onnxsim_check_is_an_export_error(
    tiny: MobileOne, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", lambda proto: (proto, False))
    with pytest.raises(ExportFailedError) as raised:
        _export_tiny(tiny, tmp_path / "broken.onnx")
    assert raised.value.message == "onnxsim could not validate the simplified ONNX model"
    assert raised.value.exit_code == EXIT_EXPORT_FAILED
    assert raised.value.hint and "simplify=False" in raised.value.hint

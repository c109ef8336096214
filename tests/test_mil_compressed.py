"""mobileone_cli.mil on compressed programs: constexpr weights, quantize and dequantize.

Each op is pinned against a case worked out by hand from the formula in
coremltools 9's op definitions (iOS16/constexpr_ops.py, iOS17/quantization_ops.py,
iOS18/compression.py); then whole programs compressed by coremltools are evaluated
and compared with torch running the same fake-quantized or palettized weights.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mobileone_cli import mil
from mobileone_cli.export import coreml as coreml_export
from mobileone_cli.export.backend import WriteContext
from mobileone_cli.fold import fold_state
from mobileone_cli.mil import quiet_coremltools, run_program, summarize_program, trace_program
from mobileone_cli.model import build_model
from mobileone_cli.options import CoreMLOptions
from mobileone_cli.synthetic import make_train_state
from mobileone_cli.variants import ArchitectureSpec, VariantConfig, build_spec

SIZE = 32
# k-means on small groups: fewer distinct weights than palette entries is expected, not a bug.
pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def call(op_type: str, **inputs: Any) -> np.ndarray:
    """Run one op of the evaluator on numpy inputs (no program around it)."""
    op = mil._Op(type=op_type, output="out",
                 inputs={name: (value,) for name, value in inputs.items()})
    return np.asarray(mil._OPS[op_type](op))


# --- Ops, against hand-computed cases ---------------------------------------------------


def test_affine_dequantize_applies_scale_and_zero_point_along_the_axis() -> None:
    data = np.array([[-128, 0, 127], [10, 20, 30]], dtype=np.int8)
    result = call("constexpr_affine_dequantize", quantized_data=data,
                  zero_point=np.array([0, 10], dtype=np.int8),
                  scale=np.array([0.5, 2.0], dtype=np.float32), axis=np.int32(0))
    np.testing.assert_array_equal(result, [[-64.0, 0.0, 63.5], [0.0, 20.0, 40.0]])


def test_affine_dequantize_scalar_parameters_and_uint8() -> None:
    data = np.array([0, 128, 255], dtype=np.uint8)
    result = call("constexpr_affine_dequantize", quantized_data=data,
                  zero_point=np.uint8(128), scale=np.float32(0.25), axis=np.int32(0))
    np.testing.assert_array_equal(result, [-32.0, 0.0, 31.75])


def test_blockwise_shift_scale_repeats_each_scale_over_its_block() -> None:
    data = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=np.int8)
    scale = np.array([[0.5], [10.0]], dtype=np.float32)  # 2 blocks of 2 rows
    np.testing.assert_array_equal(
        call("constexpr_blockwise_shift_scale", data=data, scale=scale),
        [[0.5, 1.0], [1.5, 2.0], [50.0, 60.0], [70.0, 80.0]])
    offset = np.array([[1], [5]], dtype=np.int8)
    np.testing.assert_array_equal(
        call("constexpr_blockwise_shift_scale", data=data, scale=scale, offset=offset),
        [[0.0, 0.5], [1.0, 1.5], [0.0, 10.0], [20.0, 30.0]])


def test_lut_to_dense_ios16_unpacks_indices_from_the_least_significant_bit() -> None:
    # The op's documented example: 2-bit indices, shape (5,), bytes | 01 10 11 00 | xx.. 11 |.
    indices = np.array([0b01101100, 0b00000011], dtype=np.uint8)
    lut = np.array([10.0, 20.0, 30.0, 40.0], dtype=np.float32)
    result = call("constexpr_lut_to_dense", indices=indices, lut=lut,
                  shape=np.array([5], dtype=np.uint32))
    np.testing.assert_array_equal(result, [10.0, 40.0, 30.0, 20.0, 40.0])


def test_lut_to_dense_ios18_one_table_per_group_of_rows() -> None:
    # The op's documented Case 1: 2 tables over the first axis, 2-bit indices of shape (6, 2).
    indices = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3], dtype=np.uint8).reshape(6, 2)
    lut = np.array([1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0],
                   dtype=np.float16).reshape(2, 1, 4, 1)
    result = call("constexpr_lut_to_dense", indices=indices, lut=lut)
    np.testing.assert_array_equal(
        result, [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]])


def test_packed_sub_byte_values_straddle_bytes_and_sign_extend() -> None:
    # 6-bit values 1, 63, 32, 5: bits LSB first, 24 bits in three bytes.
    values = [1, 63, 32, 5]
    stream = sum(value << (6 * index) for index, value in enumerate(values))
    packed = stream.to_bytes(3, "little")
    np.testing.assert_array_equal(mil._unpack_bits(packed, "uint6", (4,)), values)
    # int4: 0x7, 0x8, 0xF, 0x1 are 7, -8, -1, 1.
    packed4 = bytes([0x87, 0x1F])
    np.testing.assert_array_equal(mil._unpack_bits(packed4, "int4", (2, 2)), [[7, -8], [-1, 1]])


def test_quantize_rounds_half_to_even_adds_the_zero_point_and_clips() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0], dtype=np.float32)
    result = call("quantize", input=x, scale=np.float32(1.0), output_dtype="int8")
    np.testing.assert_array_equal(result, [0, 2, 2, 0, 127, -128])
    assert result.dtype == np.int8
    shifted = call("quantize", input=x, scale=np.float32(0.5),
                   zero_point=np.uint8(128), output_dtype="uint8")
    np.testing.assert_array_equal(shifted, [129, 131, 133, 127, 255, 0])


def test_quantize_and_dequantize_per_axis() -> None:
    x = np.array([[[1.0]], [[1.0]]], dtype=np.float32)  # shape (2, 1, 1), axis 0
    scale = np.array([0.5, 0.25], dtype=np.float32)
    quantized = call("quantize", input=x, scale=scale, axis=np.int32(0), output_dtype="int8")
    np.testing.assert_array_equal(quantized.reshape(-1), [2, 4])
    back = call("dequantize", input=quantized, scale=scale,
                zero_point=np.array([1, -1], dtype=np.int8), axis=np.int32(0))
    np.testing.assert_array_equal(back.reshape(-1), [0.5, 1.25])


def test_quantize_divides_in_fp16_for_an_fp16_input() -> None:
    # fp16 0.1 is 0.0999755859375: 3.0 / it = 30.007 -> 30; results are int8 whatever the input.
    x = np.array([0.1, 3.0, -0.25], dtype=np.float16)
    result = call("quantize", input=x, scale=np.float16(0.1), output_dtype="int8")
    np.testing.assert_array_equal(result, [1, 30, -2])
    assert result.dtype == np.int8


# --- Whole compressed programs ----------------------------------------------------------


TINY = VariantConfig("tiny", (0.25, 0.25, 0.25, 0.25), conv_branches=2, se_blocks=(0, 0, 1, 0))


@pytest.fixture(scope="module")
def tiny() -> tuple[ArchitectureSpec, dict[str, torch.Tensor]]:
    """A reduced-width MobileOne (every block kind, one squeeze-excite pair), folded."""
    spec = build_spec(TINY, num_classes=10)
    return spec.folded(), fold_state(spec, make_train_state(spec))


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).numpy()


def export_package(spec: ArchitectureSpec, state: dict[str, torch.Tensor], path: Path, *,
                   target: str, precision: str) -> Path:
    model = build_model(spec, state)
    coreml_export.write(model, path, context=WriteContext(
            input_size=SIZE, output_name="logits", metadata={}, mean=MEAN, std=STD,
            options=CoreMLOptions(target=target, precision=precision)))
    return path


def compress(package: Path, destination: Path, config: Any, *, palettize: bool) -> Path:
    import coremltools as ct
    import coremltools.optimize.coreml as optimize

    model = ct.models.MLModel(str(package), skip_model_load=True)
    with quiet_coremltools():
        compressed = (optimize.palettize_weights if palettize
                      else optimize.linear_quantize_weights)(
            model, optimize.OptimizationConfig(global_config=config))
        compressed.save(str(destination))
    return destination


def run_all(package: Path, batch: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [run_program(package, {"image": batch[i : i + 1]})["logits"] for i in range(len(batch))]
    ).astype(np.float64)


def run_torch(spec: ArchitectureSpec, state: dict[str, torch.Tensor], batch: np.ndarray,
              dtype: torch.dtype) -> np.ndarray:
    model = build_model(spec, state, dtype=dtype)
    with torch.inference_mode():
        return model(torch.from_numpy(batch).to(dtype)).double().numpy()


def per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    """Independent of the code under test: symmetric int8 per output channel, in the dtype."""
    maximum = weight.reshape(len(weight), -1).abs().amax(dim=1)
    scale = ((maximum + maximum) / 254).reshape(-1, *([1] * (weight.dim() - 1)))
    quantized = torch.clamp(torch.round(weight / scale), -127, 127)
    return (quantized.float() * scale.float()).to(weight.dtype)


def relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize(("target", "op"), [("iOS16", "constexpr_affine_dequantize"),
                                            ("iOS18", "constexpr_blockwise_shift_scale")])
def test_int8_weights_evaluate_like_torch_with_the_same_weights(
    tiny: tuple[ArchitectureSpec, dict[str, torch.Tensor]], inputs: np.ndarray,
    tmp_path: Path, target: str, op: str,
) -> None:
    import coremltools.optimize.coreml as optimize

    spec, state = tiny
    package = export_package(spec, state, tmp_path / "fp32.mlpackage", target=target,
                             precision="fp32")
    config = optimize.OpLinearQuantizerConfig(mode="linear_symmetric",
                                              granularity="per_channel", weight_threshold=0)
    compressed = compress(package, tmp_path / "w8.mlpackage", config, palettize=False)
    assert summarize_program(compressed).op_counts[op] == 48  # 47 convs and the classifier
    quantized = {key: per_channel_int8(value) if key.endswith(".weight") else value
                 for key, value in state.items()}
    expected = run_torch(spec, quantized, inputs, torch.float32)
    actual = run_all(compressed, inputs)
    # Measured 2.7e-6: fp32 rounding only. Against the unquantized model: 0.16.
    assert relative(actual, expected) < 2e-5
    assert relative(actual, run_torch(spec, state, inputs, torch.float32)) > 1e-2


def test_fp16_palettized_program_equals_torch_fp16_with_its_decompressed_weights(
    tiny: tuple[ArchitectureSpec, dict[str, torch.Tensor]], inputs: np.ndarray, tmp_path: Path,
) -> None:
    import coremltools.optimize.coreml as optimize

    spec, state = tiny
    package = export_package(spec, state, tmp_path / "fp16.mlpackage", target="iOS18",
                             precision="fp16")
    config = optimize.OpPalettizerConfig(nbits=4, mode="kmeans", granularity="per_grouped_channel",
                                         group_size=4, weight_threshold=0)
    compressed = compress(package, tmp_path / "pal4.mlpackage", config, palettize=True)
    assert summarize_program(compressed).op_counts["constexpr_lut_to_dense"] >= 45
    traced = trace_program(compressed, {"image": inputs[:1]})
    decompressed = dict(state)
    for name, value in traced.items():
        stem, found, _ = name.partition("_weight")
        if found and value.ndim >= 2:
            key = stem.replace("_", ".").replace("reparam.conv", "reparam_conv") + ".weight"
            assert key in state, name
            # 4 bits: at most 16 distinct values per group of 4 output channels.
            groups = value.reshape(-1, 4, *value.shape[1:]) if len(value) % 4 == 0 else [value]
            assert all(len(np.unique(group)) <= 16 for group in groups)
            decompressed[key] = torch.from_numpy(value.astype(np.float32))
    expected = run_torch(spec, decompressed, inputs, torch.float16)
    # Measured 0.0: the evaluator's fp16 arithmetic is torch's CPU fp16, bit for bit.
    assert relative(run_all(compressed, inputs), expected) < 1e-3


def test_a_corrupted_palette_is_seen(
    tiny: tuple[ArchitectureSpec, dict[str, torch.Tensor]], inputs: np.ndarray, tmp_path: Path,
) -> None:
    """Reversing one layer's palettes changes the program's output far beyond fp16 noise."""
    import coremltools.optimize.coreml as optimize

    spec, state = tiny
    package = export_package(spec, state, tmp_path / "fp32.mlpackage", target="iOS18",
                             precision="fp32")
    config = optimize.OpPalettizerConfig(nbits=8, mode="kmeans", granularity="per_grouped_channel",
                                         group_size=16, weight_threshold=0)
    good = compress(package, tmp_path / "pal8.mlpackage", config, palettize=True)
    bad = tmp_path / "bad.mlpackage"
    shutil.copytree(good, bad)
    corrupt_first_palette(bad)
    good_error = relative(run_all(good, inputs), run_torch(spec, state, inputs, torch.float32))
    bad_error = relative(run_all(bad, inputs), run_torch(spec, state, inputs, torch.float32))
    assert good_error < 0.05
    assert bad_error > 10 * good_error


def corrupt_first_palette(package: Path) -> None:
    """Reverse the look-up table of the stem's conv in place in weight.bin."""
    program = mil._read_program(package)
    weights = program.model_dir / "weights" / "weight.bin"
    for op in program.block.operations:
        if op.type == "constexpr_lut_to_dense":
            lut = op.inputs["lut"].arguments[0].value
            shape = tuple(d.constant.size for d in lut.type.tensorType.dimensions)
            values = mil._WeightFiles(program.model_dir).read(
                lut.blobFileValue.fileName, lut.blobFileValue.offset, "fp32", shape)
            blob = bytearray(weights.read_bytes())
            raw = np.ascontiguousarray(values[..., ::-1, :]).astype(np.float32).tobytes()
            # `offset` points at the blob's metadata record; its bytes 16-24 hold the data offset.
            (start,) = struct.unpack_from("<Q", blob, lut.blobFileValue.offset + 16)
            blob[start : start + len(raw)] = raw
            weights.write_bytes(bytes(blob))
            return
    raise AssertionError("no palettized op")

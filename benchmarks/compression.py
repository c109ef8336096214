"""What each compression mode costs: size, agreement with fp32, accuracy, on real and synthetic models.

    PYTHONPATH=. .venv/bin/python benchmarks/compression.py                # digits + S0
    PYTHONPATH=. .venv/bin/python benchmarks/compression.py --models digits

Models: the MobileOne trained on scikit-learn's digits (`fixtures/digits.py`,
held-out digits with labels, calibration on training digits) and a synthetic
S0 (seeded weights; the digits images resized to `--s0-size` as inputs, no
labels). Every Core ML and ONNX mode of `mobileone_cli.compress` is written,
evaluated in its own runtime (onnxruntime, the numpy Core ML evaluator) and
measured with `mobileone_cli.proof.compare.cost_of` against the fp32 train-time
model. Two deliberately broken quantizations show what a gate must catch:
per-tensor int8 scales on the depthwise layers, and one palette reversed.
The tight conversion proofs (artifact against its same-precision torch
reference) are printed for the modes that have one.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.digits import IMAGE_SIZE
from fixtures.digits import build as build_digits
from mobileone_cli import compress
from mobileone_cli.calibration import load_images
from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.proof.compare import cost_of
from mobileone_cli.export import coreml as coreml_export
from mobileone_cli.export import onnx as onnx_export
from mobileone_cli.export.backend import WriteContext
from mobileone_cli.files import size_of
from mobileone_cli.fold import fold_state
from mobileone_cli.mil import run_program
from mobileone_cli.model import build_model
from mobileone_cli.options import CoreMLOptions, OnnxOptions
from mobileone_cli.synthetic import make_train_state
from mobileone_cli.variants import VARIANTS, build_spec

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def coreml_runner(package: Path) -> Callable[[np.ndarray], np.ndarray]:
    def run(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([run_program(package, {"image": batch[i : i + 1]})["logits"]
                               for i in range(len(batch))]).astype(np.float64)
    return run


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    return lambda batch: np.asarray(onnx_export.open(path)(batch), dtype=np.float64)


def torch_outputs(spec: Any, state: dict[str, torch.Tensor], batch: np.ndarray,
                  dtype: torch.dtype = torch.float32) -> np.ndarray:
    model = build_model(spec, state, dtype=dtype)
    with torch.inference_mode():
        return model(torch.from_numpy(batch).to(dtype)).double().numpy()


def depthwise_layers(spec: Any) -> list[str]:
    from mobileone_cli.fold import block_prefixes

    return [f"{prefix}reparam_conv" for block, prefix in block_prefixes(spec)
            if block.groups > 1]


def broken_per_tensor_depthwise(package: Path, destination: Path, spec: Any) -> None:
    """w8, but one int8 scale per depthwise kernel (the MobileNet failure) instead of per channel."""
    import coremltools as ct
    import coremltools.optimize.coreml as optimize

    consts = compress._coreml_weight_consts(package)
    per_tensor = optimize.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                  granularity="per_tensor", weight_threshold=0)
    per_channel = optimize.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                   granularity="per_channel", weight_threshold=0)
    config = optimize.OptimizationConfig(
        global_config=per_channel,
        op_name_configs={name: per_tensor for layer in depthwise_layers(spec)
                         for name in consts.get(layer, ())})
    with quiet_coremltools():
        model = ct.models.MLModel(str(package), skip_model_load=True)
        optimize.linear_quantize_weights(model, config).save(str(destination))


def broken_onnx_per_tensor(source: Path, destination: Path, calibration: np.ndarray) -> None:
    """ONNX w8a8 with per-tensor weight scales everywhere."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._images = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._images, None)
            return None if image is None else {"image": image[None]}

    with quiet_coremltools():
        quantize_static(str(source), str(destination), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)


def corrupt_palette(package: Path, layer_index: int = 1) -> None:
    """Reverse the palette of one palettized layer in weight.bin (fp16 tables)."""
    from mobileone_cli import mil

    program = mil._read_program(package)
    weights = program.model_dir / "weights" / "weight.bin"
    found = [op for op in program.block.operations if op.type == "constexpr_lut_to_dense"]
    lut = found[layer_index].inputs["lut"].arguments[0].value
    shape = tuple(d.constant.size for d in lut.type.tensorType.dimensions)
    values = mil._WeightFiles(program.model_dir).read(
        lut.blobFileValue.fileName, lut.blobFileValue.offset, "fp16", shape)
    raw = np.ascontiguousarray(values[..., ::-1, :]).astype(np.float16).tobytes()
    blob = bytearray(weights.read_bytes())
    # `offset` points at the blob's metadata record; its bytes 16-24 hold the data offset.
    (start,) = struct.unpack_from("<Q", blob, lut.blobFileValue.offset + 16)
    blob[start : start + len(raw)] = raw
    weights.write_bytes(bytes(blob))


def measure(name: str, spec: Any, state: dict[str, torch.Tensor], inputs: np.ndarray,
            labels: np.ndarray | None, calibration: np.ndarray, size: int,
            work: Path) -> list[dict[str, Any]]:
    folded_spec = spec.folded()
    folded = fold_state(spec, state)
    model = build_model(folded_spec, folded)
    reference = torch_outputs(spec, state, inputs)
    rows: list[dict[str, Any]] = []

    def row(target: str, mode: str, path: Path, outputs: np.ndarray, tight: str = "",
            seconds: float = 0.0) -> None:
        cost = cost_of(reference, outputs, precision=mode, is_classifier=True, labels=labels)
        rows.append({"model": name, "target": target, "mode": mode, "bytes": size_of(path),
                     "cost": cost, "tight": tight, "seconds": seconds})
        print(f"{name:7} {target:6} {mode:28} {size_of(path) / 1e6:7.3f} MB  "
              f"agree {cost.top1_agreement:.3f} top5 {cost.top5_agreement:.3f} "
              f"cos {cost.mean_cosine:.4f}/{cost.worst_cosine:.4f} "
              f"rel {cost.max_rel_diff:.3g} "
              + (f"acc {cost.reference_top1:.3f}->{cost.artifact_top1:.3f} "
                 f"({cost.top1_delta:+.3f}) " if cost.top1_delta is not None else "")
              + tight + f" [{seconds:.0f}s]", file=sys.stderr, flush=True)

    # --- ONNX ---
    onnx_fp32 = work / f"{name}.onnx"
    onnx_export.export(model, onnx_fp32, metadata={}, options=OnnxOptions(), input_size=size)
    row("onnx", "fp32", onnx_fp32, onnx_runner(onnx_fp32)(inputs))
    for mode in ("fp16", "w8", "w8a8"):
        methods = ("minmax", "entropy", "percentile") if mode == "w8a8" else (None,)
        for method in methods:
            start = time.perf_counter()
            path = work / f"{name}-{mode}-{method}.onnx"
            compress.compress_onnx(onnx_fp32, path, mode=mode,
                                   calibration=calibration if mode == "w8a8" else None,
                                   method=method or "minmax")
            outputs = onnx_runner(path)(inputs)
            tight = ""
            if mode == "fp16":
                same = torch_outputs(folded_spec, folded, inputs, torch.float16)
                tight = f"tight {np.abs(outputs - same).max() / np.abs(same).max():.2g}"
            row("onnx", mode + (f" ({method})" if method else ""), path, outputs, tight,
                time.perf_counter() - start)
    start = time.perf_counter()
    broken = work / f"{name}-broken.onnx"
    broken_onnx_per_tensor(onnx_fp32, broken, calibration)
    row("onnx", "BROKEN w8a8 per-tensor", broken, onnx_runner(broken)(inputs), "",
        time.perf_counter() - start)

    # --- Core ML ---
    packages = {}
    for precision in ("fp32", "fp16"):
        package = work / f"{name}-{precision}.mlpackage"
        coreml_export.write(model, package, context=WriteContext(
            input_size=size, output_name="logits", metadata={}, mean=MEAN, std=STD,
            options=CoreMLOptions(target="iOS18", precision=precision)))
        packages[precision] = package
        row("coreml", precision, package, coreml_runner(package)(inputs))
    base = packages["fp16"]
    state16 = {key: value.to(torch.float16) for key, value in folded.items()}
    for mode in ("w8", "pal8", "pal6", "pal4", "w8a8"):
        start = time.perf_counter()
        path = work / f"{name}-{mode}.mlpackage"
        compress.compress_coreml(base, path, mode=mode,
                                 calibration=calibration if mode == "w8a8" else None)
        outputs = coreml_runner(path)(inputs)
        tight = ""
        if mode in ("w8", "w8a8"):
            same = torch_outputs(folded_spec, compress.fake_quantize_state(state16), inputs,
                                 torch.float16)
            tight = f"vs fake-quant fp16 {np.abs(outputs - same).max() / np.abs(same).max():.2g}"
        else:
            decompressed = compress.decompressed_weights(path, sample=inputs[:1])
            weights = {**state16, **{f"{layer}.weight": torch.from_numpy(value)
                                     for layer, value in decompressed.items()}}
            same = torch_outputs(folded_spec, weights, inputs, torch.float16)
            tight = f"vs decompressed fp16 {np.abs(outputs - same).max() / np.abs(same).max():.2g}"
        row("coreml", mode, path, outputs, tight, time.perf_counter() - start)
    broken_package = work / f"{name}-broken-w8.mlpackage"
    broken_per_tensor_depthwise(base, broken_package, spec)
    row("coreml", "BROKEN w8 per-tensor depthwise", broken_package,
        coreml_runner(broken_package)(inputs))
    corrupted = work / f"{name}-corrupted-pal8.mlpackage"
    shutil.copytree(work / f"{name}-pal8.mlpackage", corrupted)
    corrupt_palette(corrupted)
    row("coreml", "BROKEN pal8 one palette reversed", corrupted, coreml_runner(corrupted)(inputs))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| model | target | mode | size (MB) | top-1 agree | top-5 agree | mean cos | "
             "worst cos | max rel err | top-1 fp32 -> artifact (delta) |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for item in rows:
        cost = item["cost"]
        accuracy = (f"{cost.reference_top1:.3f} -> {cost.artifact_top1:.3f} "
                    f"({cost.top1_delta:+.3f})" if cost.top1_delta is not None else "n/a")
        lines.append(
            f"| {item['model']} | {item['target']} | {item['mode']} | {item['bytes'] / 1e6:.3f} | "
            f"{cost.top1_agreement:.3f} | {cost.top5_agreement:.3f} | {cost.mean_cosine:.4f} | "
            f"{cost.worst_cosine:.4f} | {cost.max_rel_diff:.3g} | {accuracy} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,s0")
    parser.add_argument("--s0-size", type=int, default=128)
    parser.add_argument("--s0-inputs", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = build_digits()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if "digits" in args.models:
            loaded = load_checkpoint(digits.checkpoint)
            heldout = load_images(digits.heldout, size=IMAGE_SIZE, option="--inputs")
            calibration = load_images(digits.calibration, size=IMAGE_SIZE)
            rows += measure("digits", loaded.spec, loaded.state, heldout.array, heldout.labels,
                            calibration.array, IMAGE_SIZE, work)
        if "s0" in args.models:
            spec = build_spec(VARIANTS["s0"], num_classes=1000)
            state = make_train_state(spec)
            inputs = load_images(digits.heldout, size=args.s0_size, count=args.s0_inputs,
                                 option="--inputs").array
            calibration_images = load_images(digits.calibration, size=args.s0_size,
                                             count=16).array
            rows += measure("s0", spec, state, inputs, None, calibration_images, args.s0_size,
                            work)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

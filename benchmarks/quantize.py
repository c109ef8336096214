"""Every `export --quantize` mode through the real pipeline: size, proof, cost, accuracy, latency.

    PYTHONPATH=. .venv/bin/python benchmarks/quantize.py                 # digits and S0
    PYTHONPATH=. .venv/bin/python benchmarks/quantize.py --models digits --out /tmp/q.md

Each row is one `mobileone_cli.api.export` run, exactly what `mobileone export --quantize
MODE` does: the artifact is written, proven (weight check and float-activation proof, or
the PT2E twin for ExecuTorch and LiteRT) and its cost measured against the fp32 train-time
model. Models: the MobileOne trained on scikit-learn's digits (`fixtures/digits.py`; 539
held-out digits with labels as `--inputs`, 64 training digits as `--calibration`), and a
synthetic S0 (seeded weights, 224 px; 20 digits upsampled as calibration, every 5th held
out, no labels, so its agreement figures only say how tied synthetic logits are). Latency:
batch 1, 1 thread, median of `--runs` interleaved runs in the artifact's own runtime
(onnxruntime, ExecuTorch XNNPACK, LiteRT XNNPACK); Core ML has no runtime off a Mac.
The rows with `--quantize` none are the same pipeline without it (Core ML's default is
fp16). `benchmarks/run.py --compression` runs this and adds the table to `results.md`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fixtures.digits import IMAGE_SIZE  # noqa: E402
from fixtures.digits import build as build_digits  # noqa: E402
from mobileone_cli import api  # noqa: E402
from mobileone_cli.compress import TARGET_MODES  # noqa: E402
from mobileone_cli.errors import MobileOneError  # noqa: E402
from mobileone_cli.export.registry import get_backend  # noqa: E402
from mobileone_cli.options import ExportOptions, Gates, QuantizeOptions  # noqa: E402
from mobileone_cli.report import latency_of, onnx_runner, time_interleaved  # noqa: E402
from mobileone_cli.synthetic import make_checkpoint  # noqa: E402

SUFFIXES = {"onnx": ".onnx", "coreml": ".mlpackage", "executorch": ".pte", "tflite": ".tflite"}


def runner(target: str, path: Path, size: int) -> Callable[[], object] | None:
    """A batch-1, 1-thread inference of the artifact in its own runtime; None for Core ML."""
    if target == "onnx":
        return onnx_runner(path, batch=1, size=(size, size), threads=1)
    backend = get_backend(target)
    timed = getattr(backend, "timed_runner", None)
    if timed is None:
        return None
    run = timed(path, threads=1)
    shape = tuple(int(side) for side in backend.open(path).declared.input_shape)
    inputs = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return lambda: run(inputs)


def measure(name: str, checkpoint: Path, size: int, held_out: Path | None, calibration: Path,
            work: Path, targets: list[str], runs: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target in targets:
        if get_backend(target).missing():
            print(f"skipping {target}: {get_backend(target).missing()}", file=sys.stderr)
            continue
        for mode in (None, *TARGET_MODES.get(target, ())):
            output = work / f"{name}-{target}-{mode or 'fp32'}{SUFFIXES[target]}"
            options = ExportOptions(
                source=checkpoint, targets=(target,), output=output, force=True,
                input_size=size, inputs_dir=held_out,
                gates=Gates(min_cosine=-1, min_agreement=0),  # measure, do not gate
                quantize=QuantizeOptions(mode=mode, calibration_dir=calibration if mode else None))
            start = time.perf_counter()
            try:
                result = api.export(options)
            except MobileOneError as error:
                print(f"{name} {target} {mode}: {error.message}", file=sys.stderr)
                continue
            seconds = time.perf_counter() - start
            (artifact,) = result.artifacts
            rows.append({"model": name, "target": target, "mode": mode or "none",
                         "artifact": artifact, "seconds": seconds, "path": output,
                         "passed": result.passed})
            proof = artifact.verification
            assert proof is not None
            print(f"{name:6} {target:10} {mode or 'fp32':5} {artifact.bytes / 1e6:8.3f} MB "
                  f"proof {proof.max_rel_diff:.2g}/{proof.rtol:.2g} {seconds:5.1f}s",
                  file=sys.stderr, flush=True)
    timed = [(row, runner(row["target"], row["path"], size)) for row in rows]
    timed = [(row, run) for row, run in timed if run is not None]
    torch.set_num_threads(1)
    seconds = time_interleaved([run for _, run in timed], runs=runs, warmup=3)
    for (row, _), samples in zip(timed, seconds, strict=True):
        row["latency_ms"] = latency_of(samples, runtime=row["target"], model=row["mode"],
                                       batch=1, size=(size, size), threads=1).median_ms
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| model | target | --quantize | precision | size (MB) | proof (max rel / tol) | stored weights "
              "(worst, steps) | top-1 agree | mean cos | top-1 fp32 -> artifact | export s | "
              "latency ms |"),
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        artifact = row["artifact"]
        proof, cost = artifact.verification, artifact.cost
        weights = (f"{proof.weights.worst_error:.2f} / {proof.weights.limit:g}"
                   if proof.weights else "-")
        agreement = mean = accuracy = "-"
        if cost is not None:
            agreement = "-" if cost.top1_agreement is None else f"{cost.top1_agreement:.3f}"
            mean = f"{cost.mean_cosine:.4f}"
            if cost.reference_top1 is not None and cost.artifact_top1 is not None:
                accuracy = (f"{cost.reference_top1:.3f} -> {cost.artifact_top1:.3f} "
                            f"({cost.artifact_top1 - cost.reference_top1:+.3f})")
        elif proof.top1_agreement is not None:
            agreement, mean = f"{proof.top1_agreement:.3f}", "1.0000"
        latency = f"{row['latency_ms']:.2f}" if "latency_ms" in row else "n/a"
        precision = artifact.declared.precision if artifact.declared else "-"
        lines.append(
            f"| {row['model']} | {row['target']} | {row['mode']} | {precision} | "
            f"{artifact.bytes / 1e6:.3f} | "
            f"{proof.max_rel_diff:.2g} / {proof.rtol:.2g} | {weights} | {agreement} | {mean} | "
            f"{accuracy} | {row['seconds']:.1f} | {latency} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,s0")
    parser.add_argument("--targets", default="onnx,coreml,executorch,tflite")
    parser.add_argument("--s0-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = build_digits()
    targets = args.targets.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if "digits" in args.models:
            rows += measure("digits", digits.checkpoint, IMAGE_SIZE, digits.heldout,
                            digits.calibration, work, targets, args.runs)
        if "s0" in args.models:
            calibration = work / "s0-calibration"
            calibration.mkdir()
            for image in sorted(digits.calibration.iterdir())[:20]:
                shutil.copy(image, calibration / image.name)
            checkpoint = make_checkpoint(work / "s0.pth", variant="s0", seed=0)
            rows += measure("s0", checkpoint, args.s0_size, None, calibration, work, targets,
                            args.runs)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

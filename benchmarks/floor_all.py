"""The work an `export --to all` cannot avoid, as a bare script: its "sum of the parts".

    python benchmarks/floor_all.py CHECKPOINT VARIANT

`benchmarks/floor.py` (import, load, the train-time fp32 and float64 passes,
the fold, the folded pass), then each of the six targets written by hand the
shortest way its converter documents, with the settings `mobileone export`
uses, and run once in its own runtime on the 224 x 224 inputs:

- safetensors: `safetensors.torch.save_file` of the folded state;
- ONNX: `torch.onnx.export(dynamo=False, opset 17)`, onnxsim, onnxruntime;
- Core ML: `torch.jit.trace`, `ct.convert` to an fp16 ML Program for iOS16, save
  (not run: there is no Core ML runtime on Linux, so proving it is counted as ours;
  coremltools imported as the tool imports it, `mil.import_coremltools`);
- ExecuTorch: `torch.export`, `to_edge_transform_and_lower` with XNNPACK, the runtime;
- LiteRT: `litert_torch.convert`, `ai_edge_litert`'s interpreter;
- ORT: onnxruntime's `convert_onnx_models_to_ort` of the ONNX file above, onnxruntime.

Nothing is validated, hashed, compared or staged. Imports are timed inside the
phase that first needs them, as they are in a real run. Prints one JSON line:
the seconds of each phase and the fold's relative error.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import contextlib  # after START: the clock covers every import
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from floor import Laps, run_floor  # benchmarks/ is the script's folder, first on sys.path

from mobileone_cli.mil import import_coremltools

SIZE = 224
OPSET = 17


def write_safetensors(state: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in state.items()},
              str(folder / "model.safetensors"))


def write_onnx(model: torch.nn.Module, example: torch.Tensor, images: list, folder: Path
               ) -> Path:
    import onnx
    import onnxruntime
    import onnxsim

    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, input_names=["image"],
                          output_names=["logits"], opset_version=OPSET, dynamo=False)
    simplified, _ = onnxsim.simplify(onnx.load(str(path)))
    onnx.save(simplified, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for image in images:
        session.run(None, {"image": image})
    return path


def write_coreml(model: torch.nn.Module, example: torch.Tensor, folder: Path) -> None:
    # As `mobileone` imports it: without the optional packages coremltools probes for at
    # import and a conversion of TorchScript never uses, which a plain `import coremltools`
    # in an `[all]` install spends 4.8 s on.
    ct = import_coremltools()

    traced = torch.jit.trace(model, example)
    converted = ct.convert(traced, inputs=[ct.TensorType(name="image", shape=example.shape)],
                           convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                           compute_precision=ct.precision.FLOAT16)
    converted.save(str(folder / "model.mlpackage"))


def write_executorch(model: torch.nn.Module, example: torch.Tensor, images: list,
                     folder: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    exported = torch.export.export(model, (example,))
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    path = folder / "model.pte"
    path.write_bytes(program.to_executorch().buffer)
    method = Runtime.get().load_program(path).load_method("forward")
    for image in images:
        method.execute([torch.from_numpy(image)])


def write_litert(model: torch.nn.Module, example: torch.Tensor, images: list,
                 folder: Path) -> None:
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    path = folder / "model.tflite"
    litert_torch.convert(model, (example,)).export(str(path))
    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    name = next(iter(runner.get_input_details()))
    for image in images:
        runner(**{name: image})


def write_ort(onnx_path: Path, images: list, folder: Path) -> None:
    import onnxruntime
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    convert_onnx_models_to_ort(onnx_path, output_dir=folder,
                               optimization_styles=[OptimizationStyle.Fixed])
    session = onnxruntime.InferenceSession(str(onnx_path.with_suffix(".ort")),
                                           providers=["CPUExecutionProvider"])
    for image in images:
        session.run(None, {"image": image})


def main() -> None:
    lap = Laps(START)
    lap("import")
    floor = run_floor(sys.argv[1], sys.argv[2], lap)
    model, arrays = floor.folded_model, floor.arrays
    # The static 224 x 224 files take the 224 x 224 inputs, one image at a time.
    images = [array[i : i + 1].numpy() for array in arrays if array.shape[-2:] == (SIZE, SIZE)
              for i in range(array.shape[0])]
    example = torch.zeros(1, 3, SIZE, SIZE)
    # The converters print progress on stdout, which carries this script's one JSON line.
    with tempfile.TemporaryDirectory(prefix="floor-all-") as name, \
            contextlib.redirect_stdout(sys.stderr):
        folder = Path(name)
        write_safetensors(floor.folded_state, folder)
        lap("safetensors")
        onnx_path = write_onnx(model, example, images, folder)
        lap("onnx")
        write_coreml(model, example, folder)
        lap("coreml")
        write_executorch(model, example, images, folder)
        lap("executorch")
        write_litert(model, example, images, folder)
        lap("tflite")
        write_ort(onnx_path, images, folder)
        lap("ort")
    print(json.dumps({"phases": lap.phases, "max_rel_diff": floor.max_rel_diff}))


if __name__ == "__main__":
    main()

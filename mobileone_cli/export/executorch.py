"""The folded model as an ExecuTorch program (`.pte`) lowered to XNNPACK, proven in ExecuTorch.

ExecuTorch is PyTorch's own on-device runtime (Android, iOS, embedded). The
path is the one its docs give: `torch.export` of the model on a 1 x 3 x S x S
example, `to_edge_transform_and_lower` with the `XnnpackPartitioner` (every
conv, add, activation and the classifier go to XNNPACK, the CPU backend of
phones), `to_executorch`, and the program's bytes. `open` loads the written
file in `executorch.runtime` (the same C++ runtime an app links) and runs it.

Shape: fixed, 1 x 3 x S x S, NCHW float32 in, logits (or the feature map)
out; a larger batch runs one sample at a time, another size raises a
`ValueError`. Measured with executorch 1.5.1: the head's global mean
(`aten::mean.out`) is not delegated (XNNPACK takes a mean only with
`keepdim`), so it runs in ExecuTorch's portable kernels between two XNNPACK
calls; `Declared.details` lists the delegates and the portable operators.

Metadata: a `.pte` has no metadata table, so the program carries one extra
method, `mobileone_metadata`, that returns a JSON string (ExecuTorch's
"constant methods", used the same way for LLM settings): input name and
layout, normalisation, output name, class labels and the tool's key/values.
An app reads it with `module.execute("mobileone_metadata")`.

Quantized (`context.quantization`, mode "w8a8"): ExecuTorch's PT2E flow
(`pt2e.converted_module`): `XNNPACKQuantizer` with
`get_symmetric_quantization_config(is_per_channel=True)`, int8 per-channel
symmetric weights and static int8 per-tensor activations, histogram-observed
over every calibration image; `keep_float` layers are left unannotated (the
quantizer's filter function: its `set_module_name` refuses None in 1.5.1).
The converted module is lowered as above: XNNPACK runs the int8 kernels, the
file still takes and gives float32. `write` returns the converted module with
its biases rounded as XNNPACK stores them (int32 at input x weight scale),
the tight reference: measured on the digits fixture, max relative error 0.018
and top-1 agreement 1.0 (0.10 and 0.983 with the float biases, because
folded kernels have outlier channels whose bias step exceeds an output step).
A quantized file declares `precision` "int8" and `compression` when its metadata
records the compression (`mobileone.compression`; the delegate's blob hides
its tensors), and has no `run_full_precision`. Lowering a quantized model takes longer (the
digits model: 11 s against 4 s in float).

Reproducibility: the same model and context give the same bytes (checked in
two processes with different PYTHONHASHSEED, quantized too); nothing time- or
host-dependent is serialised. Another executorch or torch version may change
them.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import BadArtifactError, UsageError
from mobileone_cli.export import pt2e
from mobileone_cli.export.backend import (
    Candidate,
    WriteContext,
    check_fits,
    in_chunks,
    read_compression,
)
from mobileone_cli.export.runtimes import (
    Runner,
    converting,
    embedded_metadata,
    metadata_details,
    missing_modules,
    pip_extra,
    quiet,
    read_embedded_metadata,
)
from mobileone_cli.quiet import last_meaningful_line
from mobileone_cli.results import Declared
from mobileone_cli.versions import version_of

if TYPE_CHECKING:
    import numpy as np
    import torch

name = "executorch"
suffix = ".pte"
extra = "executorch"

METHOD = "forward"
METADATA_METHOD = "mobileone_metadata"
DELEGATE = "XnnpackBackend"
MODES = ("w8a8",)
"""`--quantize` modes this target writes (`compress.TARGET_MODES["executorch"]`)."""
PRECISIONS = {"w8a8": "int8"}
"""`Declared.precision` of a file by the compression mode its metadata records."""
# Found without importing: a parent package's __init__ is imported, and that of
# executorch.backends.xnnpack pulls in torchao (seconds), so it is not named here.
_MODULES = ("executorch.exir", "executorch.runtime")
# ExecuTorch's ScalarType codes (TensorInfo.dtype(), c10's numbering) of the tensors we write.
_DTYPES = {6: "float32", 5: "float16", 1: "int8", 0: "uint8"}
_NATIVE_LOG_PREFIX = re.compile(r"^\[[\w.]+:\d+\]\s*")


def missing() -> str | None:
    """None when ExecuTorch's exporter and runtime are installed; else the pip command."""
    return missing_modules(_MODULES, target=name, install=pip_extra(extra))


def companions(path: Path) -> tuple[Path, ...]:
    """Nothing ships beside this target's file."""
    return ()


def write(model: torch.nn.Module, path: Path, *, context: WriteContext
          ) -> torch.nn.Module | None:
    """Lower the folded model to XNNPACK and write the `.pte` program at `path`.

    With `context.quantization` (mode "w8a8"), quantizes first as ExecuTorch
    documents it (see the module docstring) and returns the PT2E-converted
    module, the artifact's tight reference; None for the float program.
    """
    import torch

    if context.quantization is not None:
        pt2e.check_request(context.quantization, target=name, modes=MODES)
    example = torch.zeros(1, 3, context.input_size, context.input_size)
    reference: torch.nn.Module | None = None
    with converting("ExecuTorch's XNNPACK lowering",
                    hint="report it with the model's variant and the executorch version"):
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        lowered = model.eval()
        if context.quantization is not None:
            lowered = pt2e_module(model, context)
            reference = pt2e.float32_only(pt2e.round_biases(copy.deepcopy(lowered)))
        exported = torch.export.export(lowered, (example,))
        edge = to_edge_transform_and_lower(
            exported,
            partitioner=[XnnpackPartitioner()],
            constant_methods={METADATA_METHOD: embedded_metadata(context, layout="NCHW")},
        )
        program = edge.to_executorch().buffer
    path.write_bytes(program)
    return reference


def pt2e_module(model: torch.nn.Module, context: WriteContext) -> torch.nn.Module:
    """The PT2E-converted model `write` lowers for `context.quantization` (mode "w8a8"):
    XNNPACKQuantizer, int8 per-channel symmetric weights, static int8 per-tensor
    activations calibrated on `context.quantization.calibration`, `keep_float`
    layers left float. Its biases are float (`write` returns them rounded)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    quantization = context.quantization
    if quantization is None:
        raise UsageError("pt2e_module needs context.quantization",
                         hint="pass WriteContext(quantization=Quantization('w8a8', ...))")
    pt2e.check_request(quantization, target=name, modes=MODES)
    assert quantization.calibration is not None  # check_request
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    if quantization.keep_float:
        # The quantizer's `set_module_name` refuses None in executorch 1.5.1; its filter
        # function is the documented way to leave nodes unannotated.
        quantizer.set_filter_function(pt2e.outside(quantization.keep_float))
    return pt2e.converted_module(model, quantizer, quantization.calibration, input_size=context.input_size)


def _load(path: Path) -> Any:
    """The program at `path` in ExecuTorch's runtime (checked for internal consistency)."""
    failure: Exception | None = None
    with quiet() as captured:
        from executorch.runtime import Runtime

        try:
            return Runtime.get().load_program(path)
        except (RuntimeError, ValueError) as error:
            failure = error
    # The runtime's own log line ("File size is too small...") says more than its error code.
    reason = _NATIVE_LOG_PREFIX.sub("", last_meaningful_line(str(failure), captured.native))
    raise BadArtifactError(f"{path.name} is not an ExecuTorch program: {reason}",
                             hint="pass a .pte written by `mobileone export --to executorch`")


def open(path: Path) -> Candidate:
    """The `.pte` at `path` in `executorch.runtime`: what it declares, and its forward pass."""
    import numpy as np
    import torch

    program = _load(path)
    if METHOD not in program.method_names:
        raise BadArtifactError(f"{path.name} has no '{METHOD}' method",
                                 hint="pass a .pte of a model, written by mobileone")
    try:
        with quiet():
            method = program.load_method(METHOD)
            document = _embedded(program)
            details = _program_details(path)
    except (RuntimeError, ValueError) as error:  # a program whose plan is damaged
        raise BadArtifactError(f"{path.name} is not a runnable ExecuTorch program: "
                                 f"{last_meaningful_line(str(error))}",
                                 hint="pass a .pte written by `mobileone export --to "
                                      "executorch`") from None
    declared = _declared(path, method.metadata, document, details)
    expected = declared.input_shape

    def run_one(array: np.ndarray) -> np.ndarray:
        with quiet():
            outputs = method.execute([torch.from_numpy(np.ascontiguousarray(array))])
        return np.asarray(outputs[0].numpy(), dtype=np.float32)

    def run(array: np.ndarray) -> np.ndarray:
        check_fits(array, expected, name=path.name)
        batch = expected[0] if isinstance(expected[0], int) else None
        return in_chunks(run_one, array, batch=batch)

    # An int8 program has no float32 twin to run; its tight reference is the writer's.
    quantized = declared.precision == "int8"
    return Candidate(declared=declared, run=run, run_full_precision=None if quantized else run)


def _embedded(program: Any) -> dict[str, Any]:
    if METADATA_METHOD not in program.method_names:
        return {}
    values = program.load_method(METADATA_METHOD).execute([])
    return read_embedded_metadata(values[0] if values and isinstance(values[0], str) else None)


def _declared(path: Path, meta: Any, document: dict[str, Any], details: dict[str, Any]
              ) -> Declared:
    inputs = [meta.input_tensor_meta(index) for index in range(meta.num_inputs())]
    outputs = [meta.output_tensor_meta(index) for index in range(meta.num_outputs())]
    if len(inputs) != 1 or len(inputs[0].sizes()) != 4:
        shapes = [tuple(info.sizes()) for info in inputs]
        raise BadArtifactError(f"{path.name} does not take one image tensor (inputs {shapes})",
                                 hint="pass a .pte of a model, written by mobileone")
    dtype = _DTYPES.get(int(inputs[0].dtype()), f"scalar type {inputs[0].dtype()}")
    # XNNPACK's delegate blob hides its int8 tensors; the pipeline's record says what was done.
    compression = read_compression(document.get("metadata") or {})
    precision = {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype)
    if compression is not None:
        precision = PRECISIONS.get(compression.mode, precision)
    return Declared(
        runtime=f"executorch {version_of('executorch') or 'unknown'}",
        input_name=(document.get("input") or {}).get("name", "input"),
        input_shape=tuple(int(size) for size in inputs[0].sizes()),
        output_names=((document.get("output") or {}).get("name", "output"),
                      *(f"output_{index}" for index in range(1, len(outputs)))),
        layout="NCHW",
        dtype=dtype,
        precision=precision,
        details={**details, **metadata_details(document)},
        compression=compression,
    )


def _program_details(path: Path) -> dict[str, Any]:
    """Delegates and the operators left to portable kernels, read from the program's tables."""
    with quiet():
        from executorch.exir._serialize._program import deserialize_pte_binary

        program = deserialize_pte_binary(path.read_bytes()).program
    plan = next(plan for plan in program.execution_plan if plan.name == METHOD)
    return {
        "methods": sorted(plan.name for plan in program.execution_plan),
        "delegates": sorted({delegate.id for delegate in plan.delegates}),
        "delegate_calls": len(plan.delegates),
        "portable_operators": sorted({f"{op.name}.{op.overload}" if op.overload else op.name
                                      for op in plan.operators}),
    }


def timed_runner(path: Path, *, threads: int) -> Runner:
    """The bare forward pass of the `.pte`, for latency: input exactly as the file declares it.

    `threads` sizes ExecuTorch's CPU thread pool, which XNNPACK uses; the pool
    is process-wide (`_unsafe_reset_threadpool`), so time one runtime at a
    time. The first call (XNNPACK's set-up) is made here, quietly.
    """
    import torch

    program = _load(path)
    with quiet():
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
        method = program.load_method(METHOD)
        shape = tuple(method.metadata.input_tensor_meta(0).sizes())
        method.execute([torch.zeros(shape)])

    def run(array: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(array)])[0].numpy()

    return run

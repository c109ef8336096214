"""The folded model in the ORT format of ONNX Runtime Mobile, proven in onnxruntime.

ONNX Runtime Mobile (the Android/iOS packages and custom reduced builds)
loads `.ort` files: the ONNX graph already optimised and serialised as a
flatbuffer, so the phone skips parsing protobuf and optimising. `write`
exports our simplified, minimal ONNX (`export.onnx`, the same file `--to onnx`
writes; `OnnxOptions` in `WriteContext.options` apply) to a temporary folder
and converts it with onnxruntime's own converter,
`onnxruntime.tools.convert_onnx_models_to_ort`, in its "Fixed" optimisation
style at level "all" (what its docs advise for the CPU execution provider:
Conv + Relu become `com.microsoft.FusedConv`). The converter leaves out the
x86-only NCHWc layout transform unless told the target is amd64, so the file
runs on ARM phones as well.

The artifact is two files:
- `<stem>.ort`, the model, carrying the ONNX metadata (our key/values);
- `<stem>.required_operators.config` beside it, the list of operators (by
  domain and opset) that a reduced ONNX Runtime Mobile build must include
  (`build.sh --minimal_build --include_ops_by_config <file>`). `companions`
  names it, so whoever moves or hashes the `.ort` takes it along.

`open` runs the `.ort` in onnxruntime with graph optimisations off, as a
minimal build runs it (it cannot re-optimise), and reads the required
operators back from the file itself.

Reproducibility: as onnxruntime writes it, the same ONNX gives `.ort` files
that differ in their first few hundred bytes (S4: 5 layouts in 5
conversions): the kernel type-string resolver is serialised from a hash map
whose order changes from run to run. `canonical_session` rebuilds that part
with its entries sorted and keeps the model's bytes as they are, so the file
is byte-identical for the same model, options and onnxruntime version
(checked in two processes with different PYTHONHASHSEED). The converter also
writes the absolute path of the model into the config's comment header;
`write` replaces it with the file's name, so the config is reproducible too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import BadArtifactError, UsageError
from mobileone_cli.export import onnx as onnx_export
from mobileone_cli.export.backend import Candidate, WriteContext, check_fits, in_chunks
from mobileone_cli.export.runtimes import (
    Runner,
    converting,
    missing_modules,
    quiet,
)
from mobileone_cli.options import OnnxOptions
from mobileone_cli.results import Declared
from mobileone_cli.versions import version_of

if TYPE_CHECKING:
    import numpy as np
    import torch

name = "ort"
suffix = ".ort"
extra = None

CONFIG_SUFFIX = ".required_operators.config"
FILE_IDENTIFIER = b"ORTM"
# The alignment the rebuilt file's total size keeps (flatbuffers align from the end).
_ALIGNMENT = 16
OPTIMIZATION = "Fixed, level all"
# Top-level names only: finding a submodule imports its parents, and onnxruntime's
# import takes seconds. Its converter (onnxruntime.tools) ships in every onnxruntime wheel.
_MODULES = ("onnxruntime", "flatbuffers")
_CONFIG_HEADER = "# Generated from model/s:\n"


def missing() -> str | None:
    """None when onnxruntime's converter is there (it comes with onnxruntime, a dependency)."""
    return missing_modules(_MODULES, target=name, install="pip install onnxruntime")


def config_path(path: Path) -> Path:
    """The required-operators config written beside the `.ort` at `path`."""
    return path.with_name(path.stem + CONFIG_SUFFIX)


def companions(path: Path) -> tuple[Path, ...]:
    """Files that belong with the `.ort` at `path` and move, hash and ship with it."""
    return (config_path(path),)


def write(model: torch.nn.Module, path: Path, *, context: WriteContext) -> None:
    """Export the simplified ONNX, convert it to `path` (.ort) and write its config beside it."""
    options = context.options if context.options is not None else OnnxOptions()
    if not isinstance(options, OnnxOptions):
        raise UsageError(f"the ort target takes OnnxOptions, not {type(options).__name__}")
    with tempfile.TemporaryDirectory(prefix="mobileone-ort-") as folder:
        source = Path(folder) / f"{path.stem}.onnx"
        source.write_bytes(onnx_export.exported_bytes(model, context=context, options=options))
        with converting("onnxruntime's ORT format converter",
                        hint="report it with the model's variant and the onnxruntime version"):
            from onnxruntime.tools.convert_onnx_models_to_ort import (
                OptimizationStyle,
                convert_onnx_models_to_ort,
            )

            convert_onnx_models_to_ort(source, output_dir=Path(folder),
                                       optimization_styles=[OptimizationStyle.Fixed])
        converted = source.with_suffix(suffix)
        path.write_bytes(canonical_session(converted.read_bytes()))
        config = _canonical_config(config_path(converted).read_text(), model_name=path.name)
        config_path(path).write_text(config)


def canonical_session(data: bytes) -> bytes:
    """The `.ort` bytes with the session's front laid out in one fixed order.

    onnxruntime writes the model first, then the kernel type-string resolver
    (which kernel type names each op's inputs use) from a hash map whose
    iteration order changes from run to run (absl's per-table seeds), then the
    root table. So the same model gives the same resolver entries in a
    different byte layout: the first few hundred bytes differ. Flatbuffers are
    built back to front, so everything from the model table to the end of the
    file is self-contained; it is kept byte for byte, at the same distance from
    the end (so its alignment holds), and the resolver and root table are
    rebuilt in front of it with the entries sorted. A file with root fields
    this does not know is returned unchanged.
    """
    import flatbuffers
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
        ArgTypeAndIndex,
        InferenceSession,
        KernelTypeStrArgsEntry,
        KernelTypeStrResolver,
        OpIdKernelTypeStrArgsEntry,
    )

    session = InferenceSession.InferenceSession.GetRootAs(data, 0)
    known_slots = {4, 6, 10}  # ort_version, model, kernel_type_str_resolver
    vtable = session._tab.Pos - flatbuffers.encode.Get(flatbuffers.packer.soffset, data,
                                                       session._tab.Pos)
    vtable_size = flatbuffers.encode.Get(flatbuffers.packer.voffset, data, vtable)
    present = {slot for slot in range(4, vtable_size, 2) if session._tab.Offset(slot)}
    model, resolver = session.Model(), session.KernelTypeStrResolver()
    if present != known_slots or model is None or resolver is None:
        return data
    model_position = model._tab.Pos
    model_vtable = model_position - flatbuffers.encode.Get(flatbuffers.packer.soffset, data,
                                                           model_position)
    kept = data[min(model_position, model_vtable):]

    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Prep(1, len(kept))  # room only: the bytes keep their distance from the end
    builder.head = builder.head - len(kept)
    builder.Bytes[builder.head : builder.head + len(kept)] = kept
    builder.minalign = max(builder.minalign, _ALIGNMENT)
    model_offset = len(data) - model_position

    def offsets_vector(offsets: list[int]) -> int:
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return int(builder.EndVector())

    entries = []
    for op_id, type_strings in _resolver_entries(resolver):
        type_offsets = []
        for type_string, arguments in type_strings:
            argument_offsets = []
            for argument_type, index in arguments:
                ArgTypeAndIndex.Start(builder)
                ArgTypeAndIndex.AddArgType(builder, argument_type)
                ArgTypeAndIndex.AddIndex(builder, index)
                argument_offsets.append(ArgTypeAndIndex.End(builder))
            arguments_vector = offsets_vector(argument_offsets)
            name = builder.CreateString(type_string)
            KernelTypeStrArgsEntry.Start(builder)
            KernelTypeStrArgsEntry.AddKernelTypeStr(builder, name)
            KernelTypeStrArgsEntry.AddArgs(builder, arguments_vector)
            type_offsets.append(KernelTypeStrArgsEntry.End(builder))
        types_vector = offsets_vector(type_offsets)
        op_name = builder.CreateString(op_id)
        OpIdKernelTypeStrArgsEntry.Start(builder)
        OpIdKernelTypeStrArgsEntry.AddOpId(builder, op_name)
        OpIdKernelTypeStrArgsEntry.AddKernelTypeStrArgs(builder, types_vector)
        entries.append(OpIdKernelTypeStrArgsEntry.End(builder))
    entries_vector = offsets_vector(entries)
    KernelTypeStrResolver.Start(builder)
    KernelTypeStrResolver.AddOpKernelTypeStrArgs(builder, entries_vector)
    resolver_offset = KernelTypeStrResolver.End(builder)
    version = builder.CreateString(session.OrtVersion())
    InferenceSession.Start(builder)
    InferenceSession.AddOrtVersion(builder, version)
    InferenceSession.AddModel(builder, model_offset)
    InferenceSession.AddKernelTypeStrResolver(builder, resolver_offset)
    builder.Finish(InferenceSession.End(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _resolver_entries(resolver: Any) -> list[tuple[bytes, list[tuple[bytes, list[tuple[int, int]]]]]]:
    """The resolver's content, ops and type strings sorted (arguments keep their order)."""
    entries = []
    for op_index in range(resolver.OpKernelTypeStrArgsLength()):
        entry = resolver.OpKernelTypeStrArgs(op_index)
        type_strings = []
        for type_index in range(entry.KernelTypeStrArgsLength()):
            type_entry = entry.KernelTypeStrArgs(type_index)
            arguments = [(type_entry.Args(index).ArgType(), type_entry.Args(index).Index())
                         for index in range(type_entry.ArgsLength())]
            type_strings.append((type_entry.KernelTypeStr(), arguments))
        entries.append((entry.OpId(), sorted(type_strings)))
    return sorted(entries)


def _canonical_config(text: str, *, model_name: str) -> str:
    """The converter's config with its header naming the model by file name, not full path."""
    body = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]
    return _CONFIG_HEADER + f"# - {model_name}\n" + "".join(body)


def required_operators(path: Path) -> tuple[str, ...]:
    """`domain;opset;Op1,Op2` lines of the operators the `.ort` at `path` uses, read from it."""
    with tempfile.TemporaryDirectory(prefix="mobileone-ort-") as folder, quiet():
        from onnxruntime.tools.ort_format_model import create_config_from_models

        output = Path(folder) / "config"
        create_config_from_models([path], output, enable_type_reduction=False)
        lines = output.read_text().splitlines()
    return tuple(line for line in lines if line and not line.startswith("#"))


def _session(path: Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of the `.ort` at `path`, run as ORT Mobile runs it."""
    if path.read_bytes()[4:8] != FILE_IDENTIFIER:
        raise BadArtifactError(f"{path.name} is not an ORT format model",
                                 hint="pass a .ort written by `mobileone export --to ort`")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.load_model_format", "ORT")
    # Already optimised by the converter; a minimal (mobile) build cannot optimise again.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is None:
        # Idle threads sleep instead of spinning: verification shares the CPU with torch's.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:  # as `report.onnx_runner` times the .onnx, so the two compare
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime's pybind errors share no base class
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise BadArtifactError(f"{path.name} is not a valid ORT format model ({reason})",
                                 hint="pass a .ort written by `mobileone export --to ort`"
                                 ) from None


def open(path: Path) -> Candidate:
    """The `.ort` at `path` in onnxruntime (CPU): what it declares, and a run."""
    import numpy as np

    session = _session(path)
    model_input = session.get_inputs()[0]
    expected: Sequence[int | str | None] = model_input.shape
    metadata = session.get_modelmeta()
    config = config_path(path)
    declared = Declared(
        runtime=f"onnxruntime {version_of('onnxruntime') or 'unknown'}",
        input_name=model_input.name,
        input_shape=tuple(size if isinstance(size, int) else str(size) for size in expected),
        output_names=tuple(output.name for output in session.get_outputs()),
        layout="NCHW",
        dtype={"tensor(float)": "float32", "tensor(float16)": "float16"}.get(
            model_input.type, model_input.type),
        precision="fp16" if model_input.type == "tensor(float16)" else "fp32",
        details={"format": "ORT", "optimization": OPTIMIZATION,
                 "producer": f"{metadata.producer_name}".strip(),
                 "required_operators": list(required_operators(path)),
                 "required_operators_config": config.name if config.exists() else None,
                 "metadata": dict(sorted(metadata.custom_metadata_map.items()))},
    )

    def run_one(array: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {model_input.name: array})[0], dtype=np.float32)

    def run(array: np.ndarray) -> np.ndarray:
        check_fits(array, tuple(expected), name=path.name)
        batch = expected[0] if isinstance(expected[0], int) else None
        return in_chunks(run_one, array, batch=batch)

    return Candidate(declared=declared, run=run, run_full_precision=run)


def timed_runner(path: Path, *, threads: int) -> Runner:
    """The bare `session.run` of the `.ort`, for latency: input exactly as the file declares it.

    `threads` is the session's intra-op thread count (per session), nodes run
    sequentially, optimisations off as on a phone.
    """
    import numpy as np

    session = _session(path, threads=threads)
    input_name = session.get_inputs()[0].name

    def run(array: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: array})[0])

    return run

"""The one export pipeline: load, fold, prove, then stage -> write -> prove -> gate -> move.

`fold` is this pipeline with the one target safetensors; `export` runs it for
one target or many (a bundle). Each run loads and folds the checkpoint once
and computes the train-time reference once; every target and every check
shares them. Every artifact is written into a hidden staging folder beside
its destination, opened again in its own runtime (`Backend.open`) and proven
against the reference there; the destination is replaced only when every
artifact and every gate passed, so a failed or interrupted run leaves it as
it was. Nothing here knows a format: the backends do.

`verify` and `verify --manifest` go through the same `prove_artifact`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mobileone_cli import __version__
from mobileone_cli.bundle import (
    build_manifest,
    check_hashes,
    check_source_hash,
    write_bundle_files,
)
from mobileone_cli.checkpoint import LoadedCheckpoint, load_checkpoint, output_layouts
from mobileone_cli.errors import BadArtifactError, ExportFailedError, UsageError
from mobileone_cli.export import compression
from mobileone_cli.export.backend import Backend, Candidate, SharedWork, WriteContext
from mobileone_cli.export.registry import BACKENDS, backend_for_path, get_backend
from mobileone_cli.files import check_destination, replace_path, sha256_path, size_of, staging_path
from mobileone_cli.fold import fold_state
from mobileone_cli.manifest import check_bundle_files, read_manifest
from mobileone_cli.model import build_model, build_shapes_only
from mobileone_cli.options import ExportOptions, Gates, VerifyOptions
from mobileone_cli.proof.compare import (
    STORAGE_DTYPES,
    bit_identical,
    compare,
    precision_cost,
    replayed,
    torch_runner,
    with_rounded_weights,
)
from mobileone_cli.proof.inputs import (
    DEFAULT_INPUT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputBatch,
    default_inputs,
    image_inputs,
)
from mobileone_cli.proof.reference import ReferenceRun, run_module_reference, run_reference
from mobileone_cli.report import count_parameters, measure_complexity
from mobileone_cli.repvit import ModelSpec, RepVitSpec
from mobileone_cli.results import (
    Artifact,
    ArtifactCheck,
    Companion,
    ExportResult,
    GateCheck,
    ManifestCheck,
    ModelSummary,
    ParamCounts,
    PrecisionCost,
    StageSummary,
    Verification,
    significant,
)
from mobileone_cli.validation import (
    check_folded_finite,
    check_label_count,
    check_reference_finite,
    read_labels_file,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

Progress = Callable[[str], None]
# What an output file's default name starts with, per family: mobileone_s0, repvit_m0_9.
_FILE_PREFIX = {"mobileone": "mobileone", "repvit": "repvit"}


def _quiet(message: str) -> None:
    """The progress callback of a caller that wants none."""


@dataclass(frozen=True)
class FoldedModel:
    """A checkpoint folded and proven: the folded state and the reference it was checked on."""

    loaded: LoadedCheckpoint
    state: dict[str, torch.Tensor]
    reference: ReferenceRun
    verification: Verification
    keep_distillation_head: bool = False
    """A RepViT keeps both classifiers (averaged at run time) instead of one averaged Linear."""
    outputs_fp32: tuple[np.ndarray, ...] = ()
    """The folded model's own outputs on `reference.batches`, as its proof computed them."""

    @property
    def spec(self) -> ModelSpec:
        """The folded model's spec."""
        return self.loaded.spec.folded(keep_distillation_head=self.keep_distillation_head)

    def build(self) -> torch.nn.Module:
        """The folded model as an eval-mode float32 torch module."""
        return build_model(self.spec, self.state)


def fold_and_prove(loaded: LoadedCheckpoint, *, rtol: float | None = None,
                   inputs_dir: Path | None = None, input_size: int = DEFAULT_INPUT_SIZE,
                   keep_distillation_head: bool = False,
                   batches: tuple[InputBatch, ...] | None = None) -> FoldedModel:
    """Fold `loaded` in float64, run the train-time reference once, prove the fold against it.

    An already-folded source has nothing to fold: its state is taken as it is,
    and the proof says so (its reference is the source itself).
    """
    state = loaded.state if loaded.is_folded else fold_state(
        loaded.spec, loaded.state, keep_distillation_head=keep_distillation_head)
    check_folded_finite(state)  # extreme weights are bad input, not a fold bug
    if batches is None:
        batches = (image_inputs(inputs_dir, size=input_size) if inputs_dir
                   else default_inputs(input_size))
    name = "the source itself (already folded)" if loaded.is_folded else "train-time fp32"
    reference = run_reference(loaded.spec, loaded.state, batches, name=name)
    check_reference_finite(reference.outputs_fp32)
    keep = keep_distillation_head and not loaded.is_folded
    folded_model = build_model(loaded.spec.folded(keep_distillation_head=keep), state)
    run = torch_runner(folded_model)
    outputs = tuple(run(batch.array) for batch in reference.batches)
    verification = compare(reference, replayed(reference.batches, outputs), rtol=rtol)
    return FoldedModel(loaded=loaded, state=state, reference=reference,
                       verification=verification, keep_distillation_head=keep,
                       outputs_fp32=outputs)


def summarize(loaded: LoadedCheckpoint) -> ModelSummary:
    """What a checkpoint is, with its train-time and folded parameter counts."""
    spec = loaded.spec
    return ModelSummary(
        source=loaded.source,
        source_sha256=loaded.sha256,
        layout=loaded.layout,
        variant=loaded.variant,
        num_classes=spec.num_classes,
        already_folded=spec.is_folded,
        source_dtype=loaded.source_dtype,
        container=loaded.container,
        stripped_prefixes=loaded.stripped_prefixes,
        skipped_extras=loaded.skipped_extras,
        stages=stage_summaries(spec),
        params=ParamCounts(train=count_parameters(build_shapes_only(spec)),
                           fused=count_parameters(build_shapes_only(spec.folded()))),
    )


def stage_summaries(spec: ModelSpec) -> tuple[StageSummary, ...]:
    """The stem and each stage of `spec` as a table row."""
    if isinstance(spec, RepVitSpec):
        return repvit_stage_summaries(spec)
    rows = [StageSummary("stem", 1, spec.stem.out_channels, spec.stem.conv_branches,
                         spec.stem.stride, int(spec.stem.se_channels > 0))]
    for index, stage in enumerate(spec.stages, start=1):
        rows.append(StageSummary(
            name=f"stage {index}",
            blocks=len(stage),
            out_channels=stage[-1].out_channels,
            conv_branches=max(block.conv_branches for block in stage),
            stride=stage[0].stride,
            se_blocks=sum(block.se_channels > 0 for block in stage),
        ))
    return tuple(rows)


def repvit_stage_summaries(spec: RepVitSpec) -> tuple[StageSummary, ...]:
    """A RepViT's rows: its token mixers have 3 branches (3x3, 1x1, identity) until folded."""
    branches = 0 if spec.is_folded else 3
    rows = [StageSummary("stem", 2, spec.stem_channels[1], 0 if spec.is_folded else 1, 4, 0)]
    for index, stage in enumerate(spec.stages, start=1):
        blocks = list(stage.blocks)
        if stage.downsample is not None:
            blocks.insert(0, stage.downsample.pre_block)
        rows.append(StageSummary(
            name=f"stage {index}",
            blocks=len(blocks),
            out_channels=stage.blocks[-1].channels if stage.blocks else blocks[-1].channels,
            conv_branches=branches,
            stride=2 if stage.downsample is not None else 1,
            se_blocks=sum(block.se_channels > 0 for block in blocks),
        ))
    return tuple(rows)


def file_metadata(loaded: LoadedCheckpoint, *, layout: str, input_size: int,
                  verification: Verification) -> dict[str, str]:
    """What every written artifact says about itself; deterministic for the same input."""
    figures = {key: value for key, value in significant(verification.to_dict()).items()
               if isinstance(value, float)}
    return {
        "mobileone.folded": "true",
        "mobileone.variant": loaded.variant,
        "mobileone.layout": layout,
        "mobileone.num_classes": str(loaded.spec.num_classes or 0),
        "mobileone.input_size": json.dumps([3, input_size, input_size]),
        "mobileone.mean": json.dumps(IMAGENET_MEAN),
        "mobileone.std": json.dumps(IMAGENET_STD),
        "mobileone.tool_version": __version__,
        "mobileone.source_sha256": loaded.sha256,
        "mobileone.verification": json.dumps(figures, sort_keys=True),
    }


# --- targets and destinations -------------------------------------------------------------


def resolve_targets(options: ExportOptions) -> tuple[tuple[Backend, ...], tuple[tuple[str, str], ...]]:
    """The backends to run and the (target, why) of each one skipped.

    A target named on its own whose packages are missing is an error naming the
    pip command; in a bundle (`--to all`) it is skipped and said, unless it is
    in `options.required`.
    """
    if not options.targets:
        raise UsageError("no export target", hint=f"--to takes {', '.join([*BACKENDS, 'all'])}")
    backends = [get_backend(name) for name in options.targets]
    for name in options.required:
        get_backend(name)
    chosen: list[Backend] = []
    skipped: list[tuple[str, str]] = []
    for backend in backends:
        reason = backend.missing()
        if reason is None:
            chosen.append(backend)
        elif options.is_bundle and backend.name not in options.required:
            skipped.append((backend.name, reason))
        else:
            raise UsageError(f"--to {backend.name}: {reason}",
                             hint=f'pip install "mobileone-cli[{backend.extra}]"')
    return tuple(chosen), tuple(skipped)


def output_paths(options: ExportOptions, backends: tuple[Backend, ...], *,
                 stem: str) -> tuple[Path, dict[str, Path]]:
    """The destination (file, package or bundle folder) and where each target ends up."""
    if not options.is_bundle:
        [backend] = backends
        path = options.output or Path(f"{stem}{backend.suffix}")
        if not path.name.lower().endswith(backend.suffix):
            raise UsageError(f"-o {path}: a {backend.name} output ends in {backend.suffix}",
                             hint=f"name it {path.stem}{backend.suffix}")
        return path, {backend.name: path}
    folder = options.output or Path(f"{stem}-export")
    return folder, {backend.name: folder / f"{stem}{backend.suffix}" for backend in backends}


def _check_destination(destination: Path, options: ExportOptions,
                       backends: tuple[Backend, ...]) -> None:
    """Every check of the destination (see `files.check_destination`), before any work."""
    single = "package" if backends[0].suffix == ".mlpackage" else "file"
    kind = "bundle" if options.is_bundle else single
    check_destination(destination, kind=kind, force=options.force,
                      inputs=(options.source, options.inputs_dir, options.labels_file),
                      expected_bytes=size_of(options.source) * len(backends))


def check_layout(layout: str | None, loaded: LoadedCheckpoint) -> None:
    """A `--layout` the folded model can be written in, or a UsageError naming those it can."""
    if layout is None:
        return
    choices = output_layouts(loaded.spec)
    if layout.lower() not in choices:
        raise UsageError(f"a folded {loaded.spec.family} {loaded.variant} cannot be written in the "
                         f"{layout} layout", hint=f"--layout takes {', '.join(choices)} here")


def read_labels(path: Path, *, num_classes: int | None) -> tuple[str, ...]:
    """One distinct UTF-8 label a line; the count must match the classifier."""
    labels = read_labels_file(path)
    check_label_count(labels, num_classes=num_classes, source=path.name)
    return labels


# --- the pipeline -------------------------------------------------------------------------


def export(options: ExportOptions, *, progress: Progress = _quiet) -> ExportResult:
    """Fold and prove the source, then write and prove every requested target.

    Everything is staged in a hidden folder beside the destination and moved into
    place by one rename only when every check passed, so an interrupted or failed
    run leaves the destination as it was.
    """
    options = compression.with_coreml_target(options)
    backends, skipped = resolve_targets(options)
    check_options_fit_targets(options)
    quantize_plan = compression.plan(options, backends)
    if quantize_plan is not None and quantize_plan.skipped:
        skipped = (*skipped, *quantize_plan.skipped)
        backends = tuple(backend for backend in backends
                         if backend.name in quantize_plan.targets)
    if options.output is not None:  # known before loading: checked before any work
        _check_destination(options.output, options, backends)
        output_paths(options, backends, stem="")
    progress("reading checkpoint")
    loaded = load_checkpoint(options.source, ema=options.ema)
    stem = f"{_FILE_PREFIX[loaded.spec.family]}_{loaded.variant}"
    destination, paths = output_paths(options, backends, stem=stem)
    if options.output is None:
        _check_destination(destination, options, backends)
    labels = (read_labels(options.labels_file, num_classes=loaded.spec.num_classes)
              if options.labels_file else None)
    check_layout(options.safetensors.layout, loaded)
    prepared = None
    if quantize_plan is not None:
        progress("reading the calibration and held-out images")
        prepared = compression.load_inputs(options)
    progress("folding and proving the fold")
    folded = fold_and_prove(loaded, rtol=options.rtol, inputs_dir=options.inputs_dir,
                            input_size=options.input_size,
                            keep_distillation_head=options.keep_distillation_head,
                            batches=prepared.held_out if prepared else None)
    summary = summarize(loaded)
    if not folded.verification.passed:
        return ExportResult(summary, folded.verification, artifacts=(), written=False,
                            skipped=skipped)
    model = folded.build()
    layout = options.safetensors.layout or loaded.layout
    metadata = file_metadata(loaded, layout=layout, input_size=options.input_size,
                             verification=folded.verification)
    keep_float: tuple[str, ...] = ()
    if quantize_plan is not None and prepared is not None:
        if options.quantize.keep_float_count:
            progress("ranking the layers by their sensitivity to int8")
        keep_float = compression.resolve_keep_float(
            prepared, options.quantize, folded.state,
            lambda state: build_model(folded.spec, state))
    with staging_path(destination) as staged:
        if options.is_bundle:
            staged.mkdir()
        artifacts = []
        shared = SharedWork()
        for backend in backends:
            final = paths[backend.name]
            path = staged / final.name if options.is_bundle else staged
            quantization, record = None, None
            if quantize_plan is not None and prepared is not None:
                quantization, record = compression.quantization_for(
                    backend.name, options.quantize, prepared, keep_float)
            context = WriteContext(
                input_size=options.input_size, output_name=_output_name(loaded),
                metadata=(metadata if record is None
                          else compression.with_record(metadata, record)),
                mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=labels,
                options=_backend_options(options, backend.name, layout=layout),
                family=loaded.spec.family, quantization=quantization, shared=shared,
            )
            progress(f"writing {backend.name}"
                     + (f" ({quantization.mode})" if quantization else ""))
            tight_reference = backend.write(model, path, context=context)
            progress(f"proving {backend.name} in its own runtime")
            artifacts.append(prove_written(
                backend, path, final, folded=folded, model=model, rtol=options.rtol,
                gates=options.gates, compressed=quantization is not None,
                labels=prepared.labels if prepared else None, tight_reference=tight_reference))
        gate_checks = check_gates(options.gates, folded, tuple(artifacts))
        result = ExportResult(summary, folded.verification, tuple(artifacts), written=False,
                              gates=gate_checks,
                              bundle=destination if options.is_bundle else None,
                              skipped=skipped)
        if not result.passed:
            return result
        if options.is_bundle:
            progress("writing manifest.json and summary.md")
            write_bundle_files(staged, build_manifest(
                result, model=_model_facts(folded, options), input=_input_facts(options),
                command=options.command, ema=options.ema, labels=labels))
        else:  # a single file's companions move first: the file itself is the commit
            for companion in backends[0].companions(staged):
                replace_path(companion, destination.with_name(companion.name))
        replace_path(staged, destination)
    return replace(result, written=True)


def _output_name(loaded: LoadedCheckpoint) -> str:
    return "logits" if loaded.spec.num_classes is not None else "features"


def _backend_options(options: ExportOptions, name: str, *, layout: str) -> object:
    """The backend's own options object out of the run's options (None: its defaults).

    The ORT format is made from the ONNX export, so it takes the ONNX options.
    """
    if name == "safetensors":
        return replace(options.safetensors, layout=layout)
    return getattr(options, "onnx" if name == "ort" else name, None)


def check_options_fit_targets(options: ExportOptions) -> None:
    """A target-specific option asked of a run without that target: a usage error."""
    wanted = set(options.targets)
    for option, asked, takes in (
        ("--image-input", options.coreml.image_input, {"coreml"}),
        ("--channels-last", options.tflite.channels_last, {"tflite"}),
        ("--dynamic-batch", options.onnx.dynamic_batch, {"onnx", "ort"}),
        ("--dynamic-size", options.onnx.dynamic_size, {"onnx", "ort"}),
    ):
        if asked and not wanted & takes:
            raise UsageError(f"{option} applies to --to {' or '.join(sorted(takes))}, not to "
                             f"{', '.join(options.targets)}",
                             hint=f"drop {option}, or export to {' or '.join(sorted(takes))}")


def prove_written(backend: Backend, path: Path, final: Path, *, folded: FoldedModel,
                  model: torch.nn.Module, rtol: float | None, gates: Gates,
                  compressed: bool = False, labels: np.ndarray | None = None,
                  tight_reference: torch.nn.Module | None = None) -> Artifact:
    """Open a freshly written artifact in its runtime and prove it; its record names `final`."""
    try:
        candidate = backend.open(path)
    except BadArtifactError as error:  # we wrote it: unreadable means the converter failed
        raise ExportFailedError(f"the written {backend.name} file cannot be opened again: "
                                f"{error.message}") from None
    if compressed != (candidate.declared.compression is not None):
        raise ExportFailedError(f"the {backend.name} writer {'ignored' if compressed else 'made'} "
                                "the compression asked of it")
    verification, cost = prove_artifact(candidate, folded.reference, model=model, rtol=rtol,
                                        gates=gates, labels=labels,
                                        tight_reference=tight_reference, fold=folded)
    companions = tuple(Companion(path=final.with_name(companion.name),
                                 sha256=sha256_path(companion), bytes=size_of(companion))
                       for companion in backend.companions(path))
    return Artifact(path=final, format=backend.name, sha256=candidate.sha256 or sha256_path(path),
                    bytes=size_of(path), verification=verification, cost=cost,
                    declared=candidate.declared, companions=companions)


def prove_artifact(candidate: Candidate, reference: ReferenceRun, *, model: torch.nn.Module,
                   rtol: float | None, gates: Gates, labels: np.ndarray | None = None,
                   tight_reference: torch.nn.Module | None = None,
                   fold: FoldedModel | None = None,
                   ) -> tuple[Verification, PrecisionCost | None]:
    """The conversion proof of `candidate` and, for reduced precision, its measured cost.

    The reference is restricted to the artifact's static input size and
    soft-maxed for a probabilities output. A full-precision artifact is proven
    against the train-time model. A reduced-precision one is proven with
    float32 arithmetic on its stored weights against the torch module it
    converts (`Candidate.as_torch`) with its weights rounded alike, both under
    the fp32 noise-floor rule; then run in its own arithmetic against the fp32
    train-time model, which measures (and gates) what the precision costs. A
    compressed artifact (`export --quantize`) is proven by `compression.prove_compressed`.
    `labels`: the true classes of the reference inputs, for accuracy figures.

    With `fold` (the proven fold `model` was built from), a weights-only candidate whose
    tensors are the fold's bit for bit (`Candidate.state`) is not run again: the outputs
    of the same weights under the same arithmetic stand for its own, and its
    `Verification.reference` says so.
    """
    declared = candidate.declared
    size = declared.static_size
    try:
        if size is not None:
            reference = reference.restricted_to(size, size)
        if declared.outputs_probabilities:
            reference = reference.softmaxed()
        if labels is not None and not _kept_all(reference, labels):
            labels = None  # the file's static size left some labelled inputs out
        if declared.compression is not None and declared.compression.mode != "fp16":
            return compression.prove_compressed(
                candidate, reference, model=model, rtol=rtol, gates=gates, labels=labels,
                tight_reference=tight_reference)
        if declared.precision == "fp32":
            if fold is not None and _holds_the_fold(candidate, fold, dtype="float32"):
                return compare(replace(reference, name=f"{reference.name}{HOLDS_THE_FOLD}"),
                               replayed(fold.reference.batches, fold.outputs_fp32),
                               rtol=rtol), None
            return compare(reference, candidate.run, rtol=rtol), None
        if candidate.run_full_precision is None or declared.precision not in STORAGE_DTYPES:
            raise ExportFailedError(f"{declared.runtime} cannot evaluate a {declared.precision} "
                                    "artifact with float32 arithmetic, so it cannot be proven")
        dtype = STORAGE_DTYPES[declared.precision]
        equivalent = candidate.as_torch(model) if candidate.as_torch else model
        same_weights = run_module_reference(
            with_rounded_weights(equivalent, dtype), reference.batches,
            name=f"folded model with {dtype} weights", is_classifier=reference.is_classifier)
        full_precision, run = candidate.run_full_precision, candidate.run
        if fold is not None and _holds_the_fold(candidate, fold, dtype=dtype):
            # The file's float32 evaluation is the rounded model's own: reuse its outputs.
            rounded = replayed(same_weights.batches, same_weights.outputs_fp32)
            run = rounded if run is full_precision else run
            full_precision = rounded
            same_weights = replace(same_weights, name=f"{same_weights.name}{HOLDS_ROUNDED}")
        verification = compare(same_weights, full_precision, rtol=rtol)
        quantized = declared.compression is not None
        min_cosine, min_agreement = gates.cost_gates(quantized=quantized)
        cost = precision_cost(reference, run,
                              precision=declared.compression.mode if declared.compression
                              else declared.precision,
                              min_cosine=min_cosine, min_agreement=min_agreement,
                              labels=labels)
    except ValueError as error:  # an input or output shape that does not fit the checkpoint
        raise BadArtifactError(f"the artifact does not fit the checkpoint: {error}",
                               hint="check which checkpoint the artifact came from") from None
    return verification, cost


def _kept_all(reference: ReferenceRun, labels: np.ndarray) -> bool:
    """Whether every labelled input is still in the (size-restricted) reference."""
    return sum(len(batch.array) for batch in reference.batches) == len(labels)


# Appended to a `Verification.reference` proven by comparing tensors, not by a second run
# (the README's "Verification" says what they mean).
HOLDS_THE_FOLD = " (bit-identical fold)"
HOLDS_ROUNDED = " (bit-identical)"


def _holds_the_fold(candidate: Candidate, fold: FoldedModel, *, dtype: str) -> bool:
    """Whether a weights-only candidate holds `fold`'s architecture and tensors (in `dtype`),
    and returns what that model returns (not probabilities), so the fold's runs stand for it."""
    return (candidate.state is not None and not candidate.declared.outputs_probabilities
            and candidate.spec == fold.spec
            and bit_identical(candidate.state, fold.state, dtype=dtype))


def check_gates(gates: Gates, folded: FoldedModel,
                artifacts: tuple[Artifact, ...]) -> tuple[GateCheck, ...]:
    """Every size gate the user set, measured."""
    checks = []
    spec = folded.spec
    if gates.max_params is not None:
        checks.append(GateCheck("max_params", gates.max_params,
                                count_parameters(build_shapes_only(spec)), "folded params"))
    if gates.max_macs is not None:
        side = folded.reference.batches[0].array.shape[-1]
        checks.append(GateCheck("max_macs", gates.max_macs,
                                measure_complexity(build_shapes_only(spec), size=(side, side)).macs,
                                "folded MACs at the export size"))
    if gates.max_size_mb is not None:
        checks.extend(GateCheck("max_size_mb", gates.max_size_mb, artifact.bytes / 1e6,
                                f"{artifact.path.name} size in MB")
                      for artifact in artifacts)
    return tuple(checks)


def _model_facts(folded: FoldedModel, options: ExportOptions) -> dict[str, object]:
    loaded = folded.loaded
    size = (options.input_size, options.input_size)
    spec = loaded.spec
    return {
        "family": loaded.spec.family,
        "variant": loaded.variant,
        "layout": options.safetensors.layout or loaded.layout,
        "num_classes": spec.num_classes,
        "params": {"train": count_parameters(build_shapes_only(spec)),
                   "fused": count_parameters(build_shapes_only(folded.spec))},
        "macs": {"train": measure_complexity(build_shapes_only(spec), size=size).macs,
                 "fused": measure_complexity(build_shapes_only(folded.spec), size=size).macs,
                 "input_size": list(size)},
        "source": {"name": loaded.source.name, "bytes": size_of(loaded.source),
                   "sha256": loaded.sha256, "layout": loaded.layout,
                   "dtype": loaded.source_dtype, "ema": options.ema},
    }


def _input_facts(options: ExportOptions) -> dict[str, object]:
    size = options.input_size
    return {"name": "image", "shape": [1, 3, size, size], "channel_order": "RGB",
            "layout": "NCHW", "scale": 1 / 255, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "normalisation": "(pixel * scale - mean) / std, pixel in 0-255",
            "dynamic_batch": options.onnx.dynamic_batch,
            "dynamic_size": options.onnx.dynamic_size,
            "coreml_image_input": options.coreml.image_input}


# --- verify -------------------------------------------------------------------------------


def artifact_backend(path: Path) -> Backend:
    """The backend of an artifact given to `verify`, by its suffix."""
    backend = backend_for_path(str(path).rstrip("/"))
    if backend is None:
        if path.is_dir() and (path / "Manifest.json").exists():
            return get_backend("coreml")
        suffixes = ", ".join(backend.suffix for backend in BACKENDS.values())
        raise BadArtifactError(f"{path} is not an artifact mobileone writes",
                               hint=f"pass a file ending in {suffixes}")
    if path.is_dir() != (backend.suffix == ".mlpackage"):
        kind = "folder" if path.is_dir() else "file"
        raise BadArtifactError(f"{path} is a {kind}, not a {backend.name} artifact",
                               hint=f"pass the {backend.suffix} that `mobileone export` wrote")
    return backend


def verify_artifact(options: VerifyOptions, *, progress: Progress = _quiet) -> ArtifactCheck:
    """Prove an artifact of any target against the train-time checkpoint it came from."""
    backend = artifact_backend(options.artifact)
    missing = backend.missing()
    if missing is not None:
        raise UsageError(f"cannot open {options.artifact}: {missing}",
                         hint=f'pip install "mobileone-cli[{backend.extra}]"')
    progress(f"opening the {backend.name} artifact")
    candidate = backend.open(options.artifact)
    size = options.input_size or candidate.declared.static_size or DEFAULT_INPUT_SIZE
    progress("reading the train-time checkpoint")
    loaded = load_checkpoint(options.against, ema=options.ema)
    progress("running the train-time model")
    folded = fold_and_prove(loaded, inputs_dir=options.inputs_dir, input_size=size)
    progress(f"running the {backend.name} artifact")
    artifact = _checked(backend, options.artifact, candidate, folded, rtol=options.rtol,
                        gates=options.gates)
    return ArtifactCheck(artifact=artifact, against=options.against, against_sha256=loaded.sha256,
                         variant=loaded.variant)


def _checked(backend: Backend, path: Path, candidate: Candidate, folded: FoldedModel, *,
             rtol: float | None, gates: Gates, model: torch.nn.Module | None = None) -> Artifact:
    try:
        verification, cost = prove_artifact(candidate, folded.reference,
                                            model=model or folded.build(), rtol=rtol, gates=gates,
                                            fold=folded)
    except BadArtifactError as error:
        raise BadArtifactError(f"{path} is not an export of {folded.loaded.source.name}: "
                               f"{error.message}", hint=error.hint) from None
    return Artifact(path=path, format=backend.name, sha256=sha256_path(path),
                    bytes=size_of(path), verification=verification, cost=cost,
                    declared=candidate.declared)


def verify_bundle(manifest_path: Path, *, against: Path | None = None,
                  rtol: float | None = None, gates: Gates | None = None,
                  progress: Progress = _quiet) -> ManifestCheck:
    """Recompute every hash of a bundle; with `against`, re-prove every artifact.

    The checkpoint is loaded, folded and run once for the whole bundle.
    """
    manifest = read_manifest(manifest_path)
    files = check_bundle_files(manifest_path.parent, manifest)
    progress("hashing the bundle")
    hashes = check_hashes(manifest, files)
    checks: list[ArtifactCheck] = []
    if against is not None:
        loaded = load_checkpoint(against)
        hashes = (*hashes, check_source_hash(manifest, against, sha256=loaded.sha256))
        size = int(manifest["input"]["shape"][-1])
        progress("running the train-time model")
        folded = fold_and_prove(loaded, input_size=size)
        model = folded.build()
        for entry in manifest["artifacts"]:
            path = files[entry["path"]]
            if path is None:
                continue
            backend = get_backend(entry["format"])
            candidate = backend.open(path)
            if compression.needs_its_twin(candidate):
                continue  # proven at export against its PT2E twin; its sha256 is checked above
            progress(f"proving {entry['path']}")
            artifact = _checked(backend, path, candidate, folded, rtol=rtol,
                                gates=gates or Gates(), model=model)
            checks.append(ArtifactCheck(artifact=artifact, against=against,
                                        against_sha256=loaded.sha256, variant=loaded.variant))
    return ManifestCheck(manifest=manifest_path, hashes=tuple(hashes),
                         verifications=tuple(checks))


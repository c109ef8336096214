"""Export a folded model to safetensors, ONNX and Core ML, each proven before it is kept.

Every artifact is written to a temporary path beside its destination, verified
there against the train-time model, and moved into place only when every
artifact of the run passed: a bundle is all or nothing. The backends share one
shape (`export(model, path, ...)`, `candidate(path)`), so this module is the
only place that knows the order of the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import (
    EXIT_OK,
    EXIT_VERIFICATION_FAILED,
    BadCheckpointError,
    UsageError,
)
from mobileone_cli.export import Artifact
from mobileone_cli.export.coreml import CoreMLOptions
from mobileone_cli.export.onnx import OnnxOptions
from mobileone_cli.validation import check_label_count, check_onnx_file, read_labels_file
from mobileone_cli.verify import DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, Verification

if TYPE_CHECKING:
    from mobileone_cli.api import FoldedModel, ModelSummary
    from mobileone_cli.verify import ReferenceRun

FORMATS = ("safetensors", "onnx", "coreml")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "coreml": ".mlpackage"}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Gates:
    """Release gates beyond numerical equivalence; None means no gate."""

    max_params: float | None = None
    max_macs: float | None = None
    max_size_mb: float | None = None
    """Per artifact, in MB of 10^6 bytes."""


@dataclass(frozen=True)
class GateCheck:
    name: str
    limit: float
    value: float
    subject: str

    @property
    def passed(self) -> bool:
        return self.value <= self.limit

    def message(self) -> str:
        excess = self.value - self.limit
        return (f"--{self.name.replace('_', '-')} failed: {self.subject} is {format_number(self.value)}, "
                f"over the limit {format_number(self.limit)} by {format_number(excess)} "
                f"({excess / self.limit:.1%})")

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.name, "subject": self.subject, "limit": self.limit,
                "value": self.value, "passed": self.passed}


def format_number(value: float) -> str:
    """Counts with thousands separators (2,078,504), sizes to four digits (8.323)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


@dataclass(frozen=True)
class ExportOptions:
    source: Path
    formats: tuple[str, ...]
    output: Path | None = None
    """A file (or .mlpackage) for one format, a folder (the bundle) for several."""
    force: bool = False
    rtol: float | None = None
    inputs_dir: Path | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    ema: bool = False
    layout: str | None = None
    labels_file: Path | None = None
    dtype: str = "float32"
    """dtype of the safetensors file's weights."""
    gates: Gates = field(default_factory=Gates)
    command: tuple[str, ...] = ()
    """The command line, recorded in a bundle's manifest."""
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    coreml: CoreMLOptions = field(default_factory=CoreMLOptions)

    @property
    def is_bundle(self) -> bool:
        return len(self.formats) > 1


@dataclass(frozen=True)
class ExportResult:
    summary: ModelSummary
    fold_verification: Verification
    artifacts: tuple[Artifact, ...]
    """Every artifact with its verification; on disk only when `written`."""
    written: bool
    gates: tuple[GateCheck, ...] = ()
    bundle: Path | None = None
    """The bundle folder (with manifest.json and summary.md) of a multi-format export."""

    @property
    def passed(self) -> bool:
        return (self.fold_verification.passed
                and all(a.verification is not None and a.verification.passed
                        for a in self.artifacts)
                and all(gate.passed for gate in self.gates))

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_VERIFICATION_FAILED

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary.to_dict()
        return {
            "variant": summary.pop("variant"),
            "layout": summary.pop("layout"),
            "num_classes": summary.pop("num_classes"),
            "params": summary.pop("params"),
            "fold_verification": self.fold_verification.to_dict(),
            "passed": self.passed,
            "written": self.written,
            "artifacts": [artifact.to_dict() for artifact in self.artifacts],
            "gates": [gate.to_dict() for gate in self.gates],
            "bundle": str(self.bundle) if self.bundle else None,
            **summary,
        }


def output_paths(options: ExportOptions, *, stem: str) -> tuple[Path, dict[str, Path]]:
    """The destination (file, package or bundle folder) and where each format ends up."""
    if not options.is_bundle:
        [name] = options.formats
        path = options.output or Path(f"{stem}{SUFFIXES[name]}")
        return path, {name: path}
    folder = options.output or Path(f"{stem}-export")
    return folder, {name: folder / f"{stem}{SUFFIXES[name]}" for name in options.formats}


def destination_kind(options: ExportOptions) -> str:
    """What `-o` names: a bundle folder, a Core ML package folder, or a single file."""
    if options.is_bundle:
        return "bundle"
    return "package" if options.formats == ("coreml",) else "file"


def read_labels(path: Path, *, num_classes: int | None) -> tuple[str, ...]:
    """One distinct UTF-8 label a line; the count must match the classifier (issue 9)."""
    labels = read_labels_file(path)
    check_label_count(labels, num_classes=num_classes, source=path.name)
    return labels


def export_model(options: ExportOptions, *, progress: Progress | None = None) -> ExportResult:
    """Fold and verify the source, then write and verify every requested format.

    Everything is staged in a hidden folder beside the destination and moved into
    place by one rename only when every check passed, so an interrupted or failed
    run leaves the destination as it was.
    """
    from mobileone_cli.api import fold_and_verify, summarize
    from mobileone_cli.checkpoint import load_checkpoint
    from mobileone_cli.files import check_destination, replace_path, size_of, staging_path

    report = progress or (lambda message: None)
    unknown = sorted(set(options.formats) - set(FORMATS))
    if unknown or not options.formats:
        raise UsageError(f"unknown export format {', '.join(unknown) or '(none)'}",
                         hint=f"--to takes {', '.join((*FORMATS, 'all'))}")
    report("reading checkpoint")
    loaded = load_checkpoint(options.source, ema=options.ema)
    destination, paths = output_paths(options, stem=f"mobileone_{loaded.variant}")
    # issue 9: every destination check before the fold; each format at most the source's size.
    check_destination(destination, kind=destination_kind(options), force=options.force,
                      inputs=(options.source, options.inputs_dir, options.labels_file),
                      expected_bytes=size_of(options.source) * len(options.formats))
    labels = (read_labels(options.labels_file, num_classes=loaded.spec.num_classes)
              if options.labels_file else None)
    report("folding and verifying")
    folded = fold_and_verify(loaded, rtol=options.rtol, inputs_dir=options.inputs_dir,
                             input_size=options.input_size)
    summary = summarize(loaded)
    if not folded.verification.passed:
        return ExportResult(summary, folded.verification, artifacts=(), written=False)
    with staging_path(destination) as staged:
        if options.is_bundle:
            staged.mkdir()
        artifacts = []
        for name, final in paths.items():
            report(f"writing and verifying {name}")
            path = staged / final.name if options.is_bundle else staged
            verification = _write_and_verify(name, path, folded, options, labels)
            artifacts.append(_artifact(name, path, final, verification))
        gates = check_gates(options.gates, folded, tuple(artifacts))
        result = ExportResult(summary, folded.verification, tuple(artifacts), written=False,
                              gates=gates, bundle=destination if options.is_bundle else None)
        if not result.passed:
            return result
        if options.is_bundle:
            from mobileone_cli.bundle import write_bundle_files

            report("writing manifest.json and summary.md")
            write_bundle_files(staged, result, folded=folded, options=options)
        replace_path(staged, destination)
    return replace(result, written=True)


def check_gates(gates: Gates, folded: FoldedModel,
                artifacts: tuple[Artifact, ...]) -> tuple[GateCheck, ...]:
    from mobileone_cli.api import count_fused_params

    checks = []
    if gates.max_params is not None:
        checks.append(GateCheck("max_params", gates.max_params,
                                count_fused_params(folded.loaded.spec), "folded params"))
    if gates.max_macs is not None:
        checks.append(GateCheck("max_macs", gates.max_macs, fused_macs(folded),
                                "folded MACs at the export size"))
    if gates.max_size_mb is not None:
        checks.extend(GateCheck("max_size_mb", gates.max_size_mb, artifact.bytes / 1e6,
                                f"{artifact.path.name} size in MB")
                      for artifact in artifacts)
    return tuple(checks)


def fused_macs(folded: FoldedModel, *, size: int | None = None) -> int:
    from mobileone_cli.model import MobileOne
    from mobileone_cli.report import measure_complexity

    side = size or folded.reference.batches[0].array.shape[-1]
    return measure_complexity(MobileOne(folded.loaded.spec.folded()), size=(side, side)).macs


def _write_and_verify(name: str, path: Path, folded: FoldedModel, options: ExportOptions,
                      labels: tuple[str, ...] | None) -> Verification:
    from mobileone_cli.api import file_metadata
    from mobileone_cli.verify import compare

    loaded = folded.loaded
    metadata = file_metadata(loaded, layout=options.layout or loaded.layout,
                             input_size=options.input_size, verification=folded.verification)
    output_name = "logits" if loaded.spec.num_classes is not None else "features"
    if name == "safetensors":
        from mobileone_cli.export import safetensors as backend

        return backend.export(folded, path, layout=options.layout or loaded.layout,
                              metadata=metadata, dtype=options.dtype, rtol=options.rtol)
    if name == "onnx":
        from mobileone_cli.export import onnx as onnx_backend

        onnx_options = _with_size(options.onnx, options.input_size)
        onnx_backend.export(folded.build(), path, metadata=metadata, options=onnx_options,
                            output_name=output_name)
        reference = folded.reference
        if not onnx_options.dynamic_size:
            reference = reference.restricted_to(options.input_size, options.input_size)
        return compare(reference, onnx_backend.candidate(path), rtol=options.rtol)
    from mobileone_cli.export import coreml as coreml_backend

    coreml_options = _with_size(options.coreml, options.input_size, labels=labels)
    coreml_backend.export(folded.build(), path, metadata=metadata, options=coreml_options,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, output_name=output_name)
    return verify_coreml(path, folded.reference.restricted_to(options.input_size,
                                                              options.input_size),
                         folded=folded, rtol=options.rtol)


def verify_coreml(path: Path, reference: ReferenceRun, *, folded: FoldedModel,
                  rtol: float | None) -> Verification:
    """fp32 programs get the fp32 rule; fp16 ones max(1e-3, 2x the model's own fp16 floor)."""
    from mobileone_cli.export import coreml as backend
    from mobileone_cli.verify import compare

    description = backend.describe(path)
    if description.is_classifier:
        reference = backend.softmax_reference(reference)
    candidate = backend.candidate(path, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if rtol is not None or description.precision != "fp16":
        return compare(reference, candidate, rtol=rtol)
    tolerance = backend.fp16_tolerance(folded.build(), reference,
                                       probabilities=description.is_classifier)
    return tolerance.apply(compare(reference, candidate, rtol=tolerance.rtol))


def _with_size(options: Any, size: int, **changes: Any) -> Any:
    return replace(options, input_size=size, **changes)


def _artifact(name: str, temporary: Path, destination: Path,
              verification: Verification) -> Artifact:
    from mobileone_cli.files import sha256_path, size_of

    return Artifact(path=destination, format=name, sha256=sha256_path(temporary),
                    bytes=size_of(temporary), verification=verification)


@dataclass(frozen=True)
class VerifyOptions:
    artifact: Path
    against: Path
    """The train-time checkpoint the artifact must reproduce."""
    inputs_dir: Path | None = None
    input_size: int | None = None
    """Side of the verification inputs; default the artifact's static size, else 224."""
    rtol: float | None = None
    ema: bool = False


@dataclass(frozen=True)
class ArtifactCheck:
    """One artifact verified against a train-time checkpoint."""

    artifact: Artifact
    against: Path
    against_sha256: str
    variant: str

    @property
    def passed(self) -> bool:
        return self.artifact.verification is not None and self.artifact.verification.passed

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_VERIFICATION_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {**self.artifact.to_dict(), "against": str(self.against),
                "against_sha256": self.against_sha256, "variant": self.variant,
                "passed": self.passed}


def artifact_format(path: Path) -> str:
    if path.is_dir():
        if path.suffix == ".mlpackage" or (path / "Manifest.json").exists():
            return "coreml"
        raise UsageError(f"{path} is a folder, not a model", hint="pass a .safetensors, .onnx "
                         "or .mlpackage artifact")
    return "onnx" if path.suffix == ".onnx" else "safetensors"


def verify_artifact(options: VerifyOptions, *, progress: Progress | None = None) -> ArtifactCheck:
    """Check a safetensors, ONNX or Core ML artifact against the train-time checkpoint."""
    from mobileone_cli.api import fold_and_verify
    from mobileone_cli.checkpoint import load_checkpoint
    from mobileone_cli.files import sha256_path, size_of
    from mobileone_cli.verify import compare

    report = progress or (lambda message: None)
    kind = artifact_format(options.artifact)
    if kind == "onnx":  # issue 9: garbage, or external data outside its folder, in one line
        check_onnx_file(options.artifact)
    size = options.input_size or static_size(options.artifact, kind) or DEFAULT_INPUT_SIZE
    report("reading the train-time checkpoint")
    loaded = load_checkpoint(options.against, ema=options.ema)
    report("running the train-time model")
    folded = fold_and_verify(loaded, inputs_dir=options.inputs_dir, input_size=size)
    reference = folded.reference
    if static_size(options.artifact, kind):
        reference = reference.restricted_to(size, size)
    report(f"running the {kind} artifact")
    try:
        if kind == "coreml":
            verification = verify_coreml(options.artifact, reference, folded=folded,
                                         rtol=options.rtol)
        elif kind == "onnx":
            from mobileone_cli.export import onnx as onnx_backend

            verification = compare(reference, onnx_backend.candidate(options.artifact),
                                   rtol=options.rtol)
        else:
            from mobileone_cli.export.safetensors import verify_file

            verification = verify_file(options.artifact, folded, rtol=options.rtol)
    except ValueError as error:  # output or input shapes that do not fit the checkpoint
        raise BadCheckpointError(f"{options.artifact} is not an export of {options.against.name}: "
                                 f"{error}", hint="check which checkpoint the artifact came from"
                                 ) from None
    artifact = Artifact(path=options.artifact, format=kind, sha256=sha256_path(options.artifact),
                        bytes=size_of(options.artifact), verification=verification)
    return ArtifactCheck(artifact=artifact, against=options.against, against_sha256=loaded.sha256,
                         variant=loaded.variant)


def static_size(path: Path, kind: str) -> int | None:
    """The fixed square input side of an ONNX or Core ML artifact; None when dynamic."""
    if kind == "onnx":
        import onnx

        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        height, width = (dim.dim_value if dim.HasField("dim_value") else None for dim in dims[2:])
    elif kind == "coreml":
        from mobileone_cli.mil import summarize_program

        _, _, shape = summarize_program(path).inputs[0]
        height, width = (value if isinstance(value, int) else None for value in shape[2:])
    else:
        return None
    if height is None or width is None:
        return None
    if height != width:
        raise UsageError(f"{path} takes {height}x{width} inputs; verification uses square ones",
                         hint="export with --dynamic-size to verify at any size")
    return height

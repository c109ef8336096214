"""Every frozen result type the core returns; the CLI renders them, `--json` serialises them.

Each result knows whether it passed and so its exit code; `to_dict` is its
JSON shape. Nothing here imports torch or any module of ours beyond `errors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobileone_cli.errors import EXIT_OK, EXIT_VERIFICATION_FAILED

MAC_CONVENTION = "multiply-accumulates of conv and linear layers (the paper's FLOPs)"


def format_number(value: float) -> str:
    """Counts with thousands separators (2,078,504), sizes to four digits (8.323)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def significant(value: Any, digits: int = 3) -> Any:
    """Floats to `digits` significant digits, recursively through dicts and lists.

    Thread scheduling may move the last bits of an fp32 sum, so figures that
    are written into files (metadata, manifests) are rounded to stay reproducible.
    """
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {key: significant(inner, digits) for key, inner in value.items()}
    if isinstance(value, list):
        return [significant(inner, digits) for inner in value]
    return value


def _finite_or_none(figures: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe figures: an infinite error (non-finite output) becomes null."""
    return {key: (value if not isinstance(value, float) or math.isfinite(value) else None)
            for key, value in figures.items()}


@dataclass(frozen=True)
class Verification:
    """How closely a candidate reproduces its reference: the conversion proof."""

    max_abs_diff: float
    max_rel_diff: float
    """max |candidate - reference| / max |reference|."""
    cosine_similarity: float
    """The lowest cosine similarity of any one sample's outputs."""
    top1_agreement: float | None
    """Fraction of samples whose arg-max class agrees; None for a headless backbone."""
    noise_floor: float
    floor_ratio: float | None
    """max_rel_diff / noise_floor: about 1 for a correct fold; None if the floor is 0."""
    rtol: float
    """The tolerance applied to max_rel_diff."""
    tolerance_rule: str
    """How `rtol` was chosen, in words (the default rule, "--rtol", a storage floor added...)."""
    inputs: tuple[str, ...]
    reference: str = "train-time fp32"
    """What the candidate was compared with."""
    weights: WeightCheck | None = None
    """A compressed artifact: its stored weights against the folded ones."""

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        return self.max_rel_diff <= self.rtol and (self.weights is None or self.weights.passed)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        figures = _finite_or_none({key: value for key, value in asdict(self).items()
                                   if key != "weights"})
        return {**figures, "inputs": list(self.inputs),
                "weights": self.weights.to_dict() if self.weights else None,
                "passed": self.passed}


@dataclass(frozen=True)
class WeightCheck:
    """Whether a compressed artifact's stored weights are a correct compression of the folded ones.

    Per layer, the largest |stored - folded| in units of the mode's step: an
    int8 channel's scale (max|w| / 127) or a palette's spread / 2^bits. Round
    to nearest keeps a correct int8 weight within half a step; a k-means
    palette keeps every weight near its centroid. A reversed row, a swapped
    index table or a corrupted palette lands many steps away.
    """

    scheme: str
    """"int8 per output channel" or "palette of 2^bits per group"."""
    layers: int
    """How many layers are stored compressed (the others must equal the rounded folded weight)."""
    worst_layer: str
    worst_error: float
    """In steps of the scheme."""
    limit: float
    worst_bias: str = ""
    """The layer whose stored bias (float, or int32 in a QDQ graph) is farthest off."""
    worst_bias_error: float = 0.0
    """max |stored - folded| / max |folded| of that bias."""
    bias_limit: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every stored weight is within `limit` steps of its folded value."""
        weights_ok = math.isfinite(self.worst_error) and self.worst_error <= self.limit
        return weights_ok and (not self.worst_bias or self.worst_bias_error <= self.bias_limit)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {**_finite_or_none(asdict(self)), "passed": self.passed}


@dataclass(frozen=True)
class Compression:
    """How an artifact was compressed by `export --quantize`, as the file records it."""

    mode: str
    """"w8", "pal4", "w8a8", "fp16" ... as `--quantize` names it."""
    weights: str
    activations: str
    kept_float: tuple[str, ...] = ()
    """Folded layers the user kept in float."""
    calibration: Mapping[str, Any] | None = None
    """Count, sha256 of the file list, method; None for weight-only modes."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this record (also what the file's metadata holds)."""
        return {"mode": self.mode, "weights": self.weights, "activations": self.activations,
                "kept_float": list(self.kept_float),
                "calibration": dict(self.calibration) if self.calibration else None}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Compression:
        """Back from `to_dict`'s shape (a file's `mobileone.compression` metadata)."""
        return cls(mode=str(record["mode"]), weights=str(record.get("weights", "")),
                   activations=str(record.get("activations", "")),
                   kept_float=tuple(record.get("kept_float") or ()),
                   calibration=record.get("calibration"))


@dataclass(frozen=True)
class PrecisionCost:
    """What a reduced-precision or compressed artifact gives up against the fp32 train-time model.

    Measured with the artifact run in its own arithmetic, on the verification
    inputs (held-out images when given); gated by `--min-cosine` on the mean
    per-sample cosine and `--min-agreement` on top-1 agreement.
    """

    precision: str
    """"fp16", "bfloat16", or the `--quantize` mode ("w8", "pal4", "w8a8" ...)."""
    top1_agreement: float | None
    top5_agreement: float | None
    mean_cosine: float
    worst_cosine: float
    max_rel_diff: float
    min_cosine: float
    """The gate on `mean_cosine`."""
    min_agreement: float
    """The gate on `top1_agreement` (classifiers only)."""
    samples: int = 0
    reference_top1: float | None = None
    """Top-1 accuracy of the fp32 train-time model on labelled inputs; None without labels."""
    artifact_top1: float | None = None

    @property
    def top1_delta(self) -> float | None:
        """artifact_top1 - reference_top1 (negative: the artifact loses accuracy)."""
        if self.reference_top1 is None or self.artifact_top1 is None:
            return None
        return self.artifact_top1 - self.reference_top1

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        agreement_ok = self.top1_agreement is None or self.top1_agreement >= self.min_agreement
        return self.mean_cosine >= self.min_cosine and agreement_ok

    def failures(self) -> list[str]:
        """One phrase per gate the figures miss."""
        failed = []
        if self.top1_agreement is not None and self.top1_agreement < self.min_agreement:
            failed.append(f"top-1 agreement {self.top1_agreement:.3f} < --min-agreement "
                          f"{self.min_agreement:g}")
        if not self.mean_cosine >= self.min_cosine:
            failed.append(f"mean cosine {self.mean_cosine:.3f} < --min-cosine {self.min_cosine:g}")
        return failed

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {**_finite_or_none(asdict(self)), "top1_delta": self.top1_delta,
                "passed": self.passed}


@dataclass(frozen=True)
class Declared:
    """What a written artifact says about itself, as read back from the file."""

    runtime: str
    """The runtime that ran it here, with its version, e.g. "onnxruntime 1.32.0"."""
    input_name: str
    input_shape: tuple[int | str, ...]
    """As the file declares it; a str is a symbolic axis."""
    output_names: tuple[str, ...]
    layout: str = "NCHW"
    """"NCHW", or "NHWC" for a channels-last input."""
    dtype: str = "float32"
    """Of the input and output tensors."""
    precision: str = "fp32"
    """What the model stores and computes in: "fp32", "fp16", "bfloat16", "int8"..."""
    outputs_probabilities: bool = False
    """The output is soft-maxed probabilities (a Core ML classifier), not logits."""
    compression: Compression | None = None
    """How `export --quantize` compressed it, as recorded in the file; None if not."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """Format-specific facts for the manifest (opset and IR, deployment target ...)."""

    @property
    def static_size(self) -> int | None:
        """The fixed square input side, or None when height or width is symbolic."""
        if len(self.input_shape) != 4:
            return None
        height, width = (self.input_shape[1:3] if self.layout == "NHWC"
                         else self.input_shape[2:4])
        if isinstance(height, int) and isinstance(width, int) and height == width:
            return height
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"runtime": self.runtime, "input_name": self.input_name,
                "input_shape": list(self.input_shape), "output_names": list(self.output_names),
                "layout": self.layout, "dtype": self.dtype, "precision": self.precision,
                "outputs_probabilities": self.outputs_probabilities,
                "compression": self.compression.to_dict() if self.compression else None,
                "details": dict(self.details)}


@dataclass(frozen=True)
class Companion:
    """A file that ships beside an artifact and is hashed with it."""

    path: Path
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this record."""
        return {"path": str(self.path), "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class Artifact:
    """One written file (or Core ML package folder), what it declares, and its proof."""

    path: Path
    format: str
    sha256: str
    bytes: int
    verification: Verification | None
    cost: PrecisionCost | None = None
    """Only for a reduced-precision artifact."""
    declared: Declared | None = None
    companions: tuple[Companion, ...] = ()
    """Files that ship beside it (ONNX Runtime Mobile's required-operators config)."""

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        return (self.verification is not None and self.verification.passed
                and (self.cost is None or self.cost.passed))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {
            "path": str(self.path),
            "format": self.format,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "verification": self.verification.to_dict() if self.verification else None,
            "cost": self.cost.to_dict() if self.cost else None,
            "declared": self.declared.to_dict() if self.declared else None,
            "companions": [companion.to_dict() for companion in self.companions],
        }


@dataclass(frozen=True)
class StageSummary:
    """One row of a model's architecture table."""

    name: str
    blocks: int
    out_channels: int
    conv_branches: int
    stride: int
    se_blocks: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return asdict(self)


@dataclass(frozen=True)
class ParamCounts:
    """Learnable parameters of the train-time and of the folded model."""

    train: int
    fused: int

    def to_dict(self) -> dict[str, int]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"train": self.train, "fused": self.fused}


@dataclass(frozen=True)
class ModelSummary:
    """What a checkpoint is: layout, variant and architecture."""

    source: Path
    source_sha256: str
    layout: str
    variant: str
    num_classes: int | None
    already_folded: bool
    source_dtype: str
    container: str | None
    stripped_prefixes: tuple[str, ...]
    skipped_extras: tuple[str, ...]
    stages: tuple[StageSummary, ...]
    params: ParamCounts

    @property
    def exit_code(self) -> int:
        """Always 0: reading a checkpoint that loads is a success."""
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {
            "source": str(self.source),
            "source_sha256": self.source_sha256,
            "layout": self.layout,
            "variant": self.variant,
            "num_classes": self.num_classes,
            "headless": self.num_classes is None,
            "already_folded": self.already_folded,
            "source_dtype": self.source_dtype,
            "container": self.container,
            "stripped_prefixes": list(self.stripped_prefixes),
            "skipped_extras": list(self.skipped_extras),
            "stages": [stage.to_dict() for stage in self.stages],
            "params": self.params.to_dict(),
        }


@dataclass(frozen=True)
class GateCheck:
    """One release gate (--max-params, --max-macs, --max-size-mb) against its measured value."""

    name: str
    limit: float
    value: float
    subject: str

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        return self.value <= self.limit

    def message(self) -> str:
        """One line naming the gate, the value and the excess."""
        excess = self.value - self.limit
        return (f"--{self.name.replace('_', '-')} failed: {self.subject} is "
                f"{format_number(self.value)}, over the limit {format_number(self.limit)} by "
                f"{format_number(excess)} ({excess / self.limit:.1%})")

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"gate": self.name, "subject": self.subject, "limit": self.limit,
                "value": self.value, "passed": self.passed}


@dataclass(frozen=True)
class ExportResult:
    """The result of `fold` and of `export`: the fold's proof and every artifact's.

    `fold` is the export pipeline with the one target safetensors, so both
    commands return this and print its JSON shape.
    """

    summary: ModelSummary
    fold_verification: Verification
    artifacts: tuple[Artifact, ...]
    """Every artifact with its verification; on disk only when `written`."""
    written: bool
    gates: tuple[GateCheck, ...] = ()
    bundle: Path | None = None
    """The bundle folder (with manifest.json and summary.md) of a multi-target export."""
    skipped: tuple[tuple[str, str], ...] = ()
    """(target, why) for each target of `--to all` whose packages are not installed."""

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        return (self.fold_verification.passed
                and all(artifact.passed for artifact in self.artifacts)
                and all(gate.passed for gate in self.gates))

    @property
    def exit_code(self) -> int:
        """The exit code this result calls for: 0 when it passed, else 3."""
        return EXIT_OK if self.passed else EXIT_VERIFICATION_FAILED

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
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
            "skipped": [{"target": target, "reason": reason} for target, reason in self.skipped],
            **summary,
        }


@dataclass(frozen=True)
class ArtifactCheck:
    """One artifact verified against a train-time checkpoint."""

    artifact: Artifact
    against: Path
    against_sha256: str
    variant: str

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        return self.artifact.passed

    @property
    def exit_code(self) -> int:
        """The exit code this result calls for: 0 when it passed, else 3."""
        return EXIT_OK if self.passed else EXIT_VERIFICATION_FAILED

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {**self.artifact.to_dict(), "against": str(self.against),
                "against_sha256": self.against_sha256, "variant": self.variant,
                "passed": self.passed}


@dataclass(frozen=True)
class HashCheck:
    """One file of a bundle: the sha256 the manifest records against the one on disk."""

    path: str
    expected: str
    actual: str | None

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        return self.actual == self.expected

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"path": self.path, "expected": self.expected, "actual": self.actual,
                "passed": self.passed}


@dataclass(frozen=True)
class ManifestCheck:
    """A bundle checked later: every hash, and every artifact's numbers when a source is given."""

    manifest: Path
    hashes: tuple[HashCheck, ...]
    verifications: tuple[ArtifactCheck, ...]
    problems: tuple[str, ...] = ()
    """Failures that are neither a hash nor a proof (an unlisted file in the bundle...)."""

    @property
    def passed(self) -> bool:
        """True when every check this result holds has passed."""
        return (not self.problems and all(check.passed for check in self.hashes)
                and all(check.passed for check in self.verifications))

    @property
    def exit_code(self) -> int:
        """The exit code this result calls for: 0 when it passed, else 3."""
        return EXIT_OK if self.passed else EXIT_VERIFICATION_FAILED

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"manifest": str(self.manifest), "passed": self.passed,
                "hashes": [check.to_dict() for check in self.hashes],
                "verifications": [check.to_dict() for check in self.verifications],
                "problems": list(self.problems)}


@dataclass(frozen=True)
class LayerSensitivity:
    """What quantizing one folded layer alone costs, and how its kernel is shaped."""

    layer: str
    relative_error: float
    """||out_q - out||^2 / ||out||^2 over the inputs, only this layer's weight fake-quantized."""
    top1_agreement: float | None
    """With the fp32 folded model; None for a headless backbone."""
    outlier: float
    """max over output channels of max|w_c| / std(w_c): how far the largest weight of a
    channel sits from its spread, in standard deviations. An int8 per-channel grid spends
    its 255 steps on [-max, max], so a large figure leaves the bulk of the weights few steps."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this row."""
        return _finite_or_none(asdict(self))


@dataclass(frozen=True)
class SensitivityReport:
    """`report --sensitivity`: every folded layer, worst first, by the error of quantizing it alone."""

    source: Path
    variant: str
    scheme: str
    """How each layer is quantized in turn, e.g. "int8 per output channel, symmetric"."""
    images: int
    images_sha256: str
    layers: tuple[LayerSensitivity, ...]

    @property
    def exit_code(self) -> int:
        """Always 0: a measurement."""
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"source": str(self.source), "variant": self.variant, "scheme": self.scheme,
                "images": self.images, "images_sha256": self.images_sha256,
                "layers": [layer.to_dict() for layer in self.layers]}

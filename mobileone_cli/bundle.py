"""A release bundle's manifest.json and summary.md, and checking a bundle later.

The manifest is reproducible by construction: artifact paths are relative to
the bundle, the source is named by file name and hash, figures are rounded to
three significant digits (thread scheduling may move the last bits of an fp32
sum), keys are sorted, and nothing records a time, a host or an absolute path.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli import __version__
from mobileone_cli.errors import EXIT_OK, EXIT_VERIFICATION_FAILED
from mobileone_cli.manifest import MANIFEST, SCHEMA_V1, SUMMARY, check_bundle_files, read_manifest
from mobileone_cli.verify import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from mobileone_cli.api import FoldedModel
    from mobileone_cli.exporting import ExportOptions, ExportResult

SCHEMA = SCHEMA_V1
RECORDED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "coremltools", "numpy")


def write_bundle_files(folder: Path, result: ExportResult, *, folded: FoldedModel,
                       options: ExportOptions) -> None:
    manifest = build_manifest(result, folded=folded, options=options)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (folder / SUMMARY).write_text(render_summary(manifest))


def build_manifest(result: ExportResult, *, folded: FoldedModel,
                   options: ExportOptions) -> dict[str, Any]:
    from mobileone_cli.exporting import fused_macs
    from mobileone_cli.files import size_of
    from mobileone_cli.model import MobileOne
    from mobileone_cli.report import measure_complexity

    loaded = folded.loaded
    size = options.input_size
    train_macs = measure_complexity(MobileOne(loaded.spec), size=(size, size)).macs
    return {
        "schema": SCHEMA,
        "tool": {"name": "mobileone", "version": __version__,
                 "command": ["mobileone", *map(portable_argument, options.command)]},
        "versions": package_versions(),
        "source": {"name": loaded.source.name, "bytes": size_of(loaded.source),
                   "sha256": loaded.sha256, "layout": loaded.layout, "dtype": loaded.source_dtype,
                   "ema": options.ema},
        "model": {
            "variant": loaded.variant,
            "layout": options.layout or loaded.layout,
            "num_classes": loaded.spec.num_classes,
            "params": {"train": result.summary.params.train, "fused": result.summary.params.fused},
            "macs": {"train": train_macs, "fused": fused_macs(folded, size=size),
                     "input_size": [size, size]},
        },
        "input": {"name": "image", "shape": [1, 3, size, size], "channel_order": "RGB",
                  "layout": "NCHW", "scale": "0-1 (pixels / 255) before normalisation",
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "dynamic_batch": options.onnx.dynamic_batch,
                  "dynamic_size": options.onnx.dynamic_size,
                  "coreml_image_input": options.coreml.image_input},
        "fold_verification": rounded(result.fold_verification.to_dict()),
        "artifacts": [
            {"path": artifact.path.name, "format": artifact.format, "bytes": artifact.bytes,
             "sha256": artifact.sha256,
             "verification": rounded(artifact.verification.to_dict())
             if artifact.verification else None}
            for artifact in result.artifacts
        ],
        "gates": [gate.to_dict() for gate in result.gates],
    }


def portable_argument(argument: str) -> str:
    """An absolute path by its last component: the manifest names no folder of this machine."""
    return Path(argument).name if Path(argument).is_absolute() else argument


def package_versions() -> dict[str, str]:
    versions = {"mobileone": __version__, "python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def rounded(value: Any) -> Any:
    """Floats to three significant digits, recursively; everything else as it is."""
    if isinstance(value, float):
        return float(f"{value:.3g}")
    if isinstance(value, dict):
        return {key: rounded(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [rounded(inner) for inner in value]
    return value


def render_summary(manifest: dict[str, Any]) -> str:
    """A short Markdown table a pipeline can post on a pull request or a release page."""
    model = manifest["model"]
    source = manifest["source"]
    classes = model["num_classes"] if model["num_classes"] is not None else "headless"
    lines = [
        f"## MobileOne {model['variant'].upper()} release bundle",
        "",
        (f"Source `{source['name']}` (sha256 `{source['sha256'][:12]}`, {source['layout']} layout), "
        f"{classes} classes, input {'x'.join(map(str, manifest['input']['shape']))}."),
        (f"Params {model['params']['train'] / 1e6:.2f} M train-time → "
        f"{model['params']['fused'] / 1e6:.2f} M folded; MACs {model['macs']['train'] / 1e6:,.0f} M"
        f" → {model['macs']['fused'] / 1e6:,.0f} M."),
        "",
        "| artifact | format | size | sha256 | max rel. error | tolerance | verified |",
        "|---|---|---:|---|---:|---:|:---:|",
    ]
    fold = manifest["fold_verification"]
    lines.append(_row("(fold)", "torch", None, None, fold))
    for artifact in manifest["artifacts"]:
        lines.append(_row(artifact["path"], artifact["format"], artifact["bytes"],
                          artifact["sha256"], artifact["verification"]))
    from mobileone_cli.exporting import format_number

    for gate in manifest["gates"]:
        verdict = "passed" if gate["passed"] else "FAILED"
        lines.append(f"\nGate `--{gate['gate'].replace('_', '-')}` {format_number(gate['limit'])}: "
                     f"{gate['subject']} {format_number(gate['value'])}, {verdict}.")
    versions = manifest["versions"]
    lines += ["", (f"mobileone {versions['mobileone']}, torch {versions['torch']}, "
                  f"onnx {versions['onnx']}, onnxruntime {versions['onnxruntime']}, "
                  f"coremltools {versions['coremltools']}."), ""]
    return "\n".join(lines)


def _row(name: str, kind: str, size: int | None, sha256: str | None,
         verification: dict[str, Any] | None) -> str:
    if verification is None:
        error, tolerance, verdict = "-", "-", "-"
    else:
        relative = verification["max_rel_diff"]
        error = "non-finite" if relative is None else f"{relative:.2g}"
        tolerance = f"{verification['rtol']:.2g}"
        verdict = "✅" if verification["passed"] else "❌"
    shown_size = f"{size / 1e6:.1f} MB" if size is not None else "-"
    shown_hash = f"`{sha256[:12]}`" if sha256 else "-"
    return f"| {name} | {kind} | {shown_size} | {shown_hash} | {error} | {tolerance} | {verdict} |"


@dataclass(frozen=True)
class HashCheck:
    path: str
    expected: str
    actual: str | None

    @property
    def passed(self) -> bool:
        return self.actual == self.expected

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "expected": self.expected, "actual": self.actual,
                "passed": self.passed}


@dataclass(frozen=True)
class ManifestCheck:
    """A bundle checked later: every hash, and every artifact's numbers when a source is given."""

    manifest: Path
    hashes: tuple[HashCheck, ...]
    verifications: tuple[Any, ...]
    """exporting.ArtifactCheck per artifact, when --against was given."""

    @property
    def passed(self) -> bool:
        return all(h.passed for h in self.hashes) and all(v.passed for v in self.verifications)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_VERIFICATION_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": str(self.manifest), "passed": self.passed,
                "hashes": [h.to_dict() for h in self.hashes],
                "verifications": [v.to_dict() for v in self.verifications]}


def verify_manifest(manifest_path: Path, *, against: Path | None = None,
                    rtol: float | None = None) -> ManifestCheck:
    """Recompute every hash of a bundle; re-run each artifact's verification against `against`.

    Nothing the manifest names is opened before manifest.py has validated the manifest,
    confined every path to the bundle, and checked the bundle holds only regular files it
    lists (issue 9).
    """
    from mobileone_cli.exporting import VerifyOptions, verify_artifact
    from mobileone_cli.files import sha256_path
    from mobileone_cli.reader import sha256_file

    manifest = read_manifest(manifest_path)
    files = check_bundle_files(manifest_path.parent, manifest)
    hashes = []
    for artifact in manifest["artifacts"]:
        path = files[artifact["path"]]
        hashes.append(HashCheck(artifact["path"], artifact["sha256"],
                                sha256_path(path) if path is not None else None))
    verifications = []
    if against is not None:
        source = manifest["source"]
        hashes.append(HashCheck(f"{against} (source)", source["sha256"], sha256_file(against)))
        size = manifest["input"]["shape"][-1]
        for artifact in manifest["artifacts"]:
            path = files[artifact["path"]]
            if path is not None:
                verifications.append(verify_artifact(VerifyOptions(
                    artifact=path, against=against, input_size=size, rtol=rtol)))
    return ManifestCheck(manifest=manifest_path, hashes=tuple(hashes),
                         verifications=tuple(verifications))

"""A release bundle's manifest.json and summary.md, and checking a bundle later.

The manifest is reproducible by construction: artifact paths are relative to
the bundle, the source is named by file name and hash, figures are rounded to
three significant digits (thread scheduling may move the last bits of an fp32
sum), keys are sorted, and nothing records a time, a host or an absolute path.
Folder artifacts (`.mlpackage`) are hashed by the scheme `files.sha256_path`
documents, which `sha256sum` reproduces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mobileone_cli import __version__
from mobileone_cli.files import sha256_path
from mobileone_cli.manifest import MANIFEST, SCHEMA_V2, SUMMARY
from mobileone_cli.results import ExportResult, HashCheck, format_number, significant
from mobileone_cli.versions import stack_versions

SCHEMA = SCHEMA_V2
_FAMILY_NAMES = {"mobileone": "MobileOne", "repvit": "RepViT"}
RECORDED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "coremltools", "numpy",
                     "executorch", "litert-torch", "ai-edge-litert")


def write_bundle_files(folder: Path, manifest: dict[str, Any]) -> None:
    """manifest.json and summary.md into the (staged) bundle folder."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    (folder / SUMMARY).write_text(render_summary(manifest), encoding="utf-8")


def build_manifest(result: ExportResult, *, model: dict[str, Any], input: dict[str, Any],
                   command: Sequence[str], ema: bool,
                   labels: Sequence[str] | None) -> dict[str, Any]:
    """The manifest of a passed export (see the README's "manifest.json" for every field)."""
    source = dict(model["source"])
    described = {key: value for key, value in model.items() if key != "source"}
    return {
        "schema": SCHEMA,
        "tool": {"name": "mobileone", "version": __version__,
                 "command": ["mobileone", *map(portable_argument, command)]},
        "versions": package_versions(),
        "source": {**source, "ema": ema},
        "model": described,
        "input": input,
        "labels": _labels_record(labels),
        "fold_verification": significant(result.fold_verification.to_dict()),
        "artifacts": [_artifact_record(artifact.to_dict()) for artifact in result.artifacts],
        "gates": [gate.to_dict() for gate in result.gates],
        "skipped": [{"target": target, "reason": reason} for target, reason in result.skipped],
    }


def _artifact_record(artifact: dict[str, Any]) -> dict[str, Any]:
    declared = artifact["declared"] or {}
    return {
        "path": Path(artifact["path"]).name,
        "format": artifact["format"],
        "bytes": artifact["bytes"],
        "sha256": artifact["sha256"],
        "runtime": declared.get("runtime"),
        "inputs": [{"name": declared.get("input_name"), "shape": declared.get("input_shape"),
                    "dtype": declared.get("dtype"), "layout": declared.get("layout")}],
        "outputs": [{"name": name, "dtype": declared.get("dtype"),
                     "probabilities": declared.get("outputs_probabilities")}
                    for name in declared.get("output_names", [])],
        "precision": declared.get("precision"),
        # The compression record rides in format_details: the v2 schema's keys stay as they are.
        "format_details": ({**declared.get("details", {}), "compression": declared["compression"]}
                           if declared.get("compression") else declared.get("details", {})),
        "verification": significant(artifact["verification"]),
        "cost": significant(artifact["cost"]),
        "companions": [{"path": Path(companion["path"]).name, "sha256": companion["sha256"],
                        "bytes": companion["bytes"]} for companion in artifact["companions"]],
    }


def _labels_record(labels: Sequence[str] | None) -> dict[str, Any] | None:
    if labels is None:
        return None
    text = "".join(f"{label}\n" for label in labels).encode("utf-8")
    return {"count": len(labels), "sha256": hashlib.sha256(text).hexdigest()}


def portable_argument(argument: str) -> str:
    """An absolute path by its last component: the manifest names no folder of this machine."""
    return Path(argument).name if Path(argument).is_absolute() else argument


def package_versions() -> dict[str, str]:
    """The tool's, Python's and every recorded package's version ("not installed" if absent)."""
    return stack_versions(RECORDED_PACKAGES, absent="not installed")


def render_summary(manifest: dict[str, Any]) -> str:
    """A short Markdown table a pipeline can post on a pull request or a release page."""
    model = manifest["model"]
    source = manifest["source"]
    classes = model["num_classes"] if model["num_classes"] is not None else "headless"
    lines = [
        f"## {_FAMILY_NAMES.get(model.get('family', 'mobileone'), 'MobileOne')} "
        f"{model['variant'].upper()} release bundle",
        "",
        (f"Source `{source['name']}` (sha256 `{source['sha256'][:12]}`, {source['layout']} layout), "
         f"{classes} classes, input {'x'.join(map(str, manifest['input']['shape']))}."),
        (f"Params {model['params']['train'] / 1e6:.2f} M train-time → "
         f"{model['params']['fused'] / 1e6:.2f} M folded; MACs {model['macs']['train'] / 1e6:,.0f} M"
         f" → {model['macs']['fused'] / 1e6:,.0f} M."),
        "",
        ("| artifact | format | precision | size | sha256 | max rel. error | tolerance | verified "
         "| top-1 agreement | mean cosine | worst cosine | top-1 accuracy |"),
        "|---|---|---|---:|---|---:|---:|:---:|---:|---:|---:|---:|",
        _row("(fold)", "torch", "fp32", None, None, manifest["fold_verification"], None),
    ]
    for artifact in manifest["artifacts"]:
        compression = artifact["format_details"].get("compression")
        precision = (f"{artifact['precision']} ({compression['mode']})" if compression
                     else artifact["precision"])
        lines.append(_row(artifact["path"], artifact["format"], precision,
                          artifact["bytes"], artifact["sha256"], artifact["verification"],
                          artifact["cost"]))
    for gate in manifest["gates"]:
        verdict = "passed" if gate["passed"] else "FAILED"
        lines.append(f"\nGate `--{gate['gate'].replace('_', '-')}` {format_number(gate['limit'])}: "
                     f"{gate['subject']} {format_number(gate['value'])}, {verdict}.")
    for skipped in manifest["skipped"]:
        lines.append(f"\nSkipped `{skipped['target']}`: {skipped['reason']}.")
    versions = manifest["versions"]
    lines += ["", (f"mobileone {versions['mobileone']}, torch {versions['torch']}, "
                   f"onnx {versions['onnx']}, onnxruntime {versions['onnxruntime']}, "
                   f"coremltools {versions['coremltools']}."), ""]
    return "\n".join(lines)


def _row(name: str, kind: str, precision: str | None, size: int | None, sha256: str | None,
         verification: dict[str, Any] | None, cost: dict[str, Any] | None) -> str:
    if verification is None:
        error, tolerance, verdict = "-", "-", "-"
    else:
        relative = verification["max_rel_diff"]
        error = "non-finite" if relative is None else f"{relative:.2g}"
        tolerance = f"{verification['rtol']:.2g}"
        verdict = "✅" if verification["passed"] else "❌"
    agreement, mean, cosine, accuracy = "-", "-", "-", "-"
    figures = cost or verification
    if figures is not None:
        top1 = figures.get("top1_agreement")
        agreement = "-" if top1 is None else f"{top1:.1%}"
        worst = figures.get("worst_cosine", figures.get("cosine_similarity"))
        cosine = "-" if worst is None else f"{worst:.4f}"
        average = figures.get("mean_cosine")
        mean = "-" if average is None else f"{average:.4f}"
        if figures.get("artifact_top1") is not None and figures.get("top1_delta") is not None:
            accuracy = f"{figures['artifact_top1']:.1%} ({figures['top1_delta']:+.1%})"
    shown_size = f"{size / 1e6:.1f} MB" if size is not None else "-"
    shown_hash = f"`{sha256[:12]}`" if sha256 else "-"
    return (f"| {name} | {kind} | {precision or '-'} | {shown_size} | {shown_hash} | {error} | "
            f"{tolerance} | {verdict} | {agreement} | {mean} | {cosine} | {accuracy} |")


# --- checking a bundle later ----------------------------------------------------------------


def check_hashes(manifest: dict[str, Any],
                 files: dict[str, Path | None]) -> tuple[HashCheck, ...]:
    """Every artifact's recorded sha256 against its file (`manifest.check_bundle_files`)."""
    checks = []
    for entry in manifest["artifacts"]:
        for record in (entry, *entry.get("companions", ())):
            path = files[record["path"]]
            checks.append(HashCheck(record["path"], record["sha256"],
                                    None if path is None else sha256_path(path)))
    return tuple(checks)


def check_source_hash(manifest: dict[str, Any], against: Path, *, sha256: str) -> HashCheck:
    """The checkpoint given with `--against` is the one the bundle was made from."""
    return HashCheck(f"{against} (source)", manifest["source"]["sha256"], sha256)

"""The tool's Python API: one function per job, each taking an options object and
returning a frozen result (see `options` and `results`).

The CLI turns its flags into the options here, calls one function and renders
the result; Python users call the same functions. Nothing here prints.

    from pathlib import Path
    from mobileone_cli import api
    from mobileone_cli.options import FoldOptions

    result = api.fold(FoldOptions(checkpoint=Path("ckpt.pth"), output=Path("s0.safetensors")))
    print(result.fold_verification.max_rel_diff, result.passed, result.exit_code)
"""

from __future__ import annotations

from pathlib import Path

from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.errors import UsageError
from mobileone_cli.export import pipeline
from mobileone_cli.export.compression import sensitivity_report
from mobileone_cli.export.registry import timing_backend
from mobileone_cli.options import (
    ExportOptions,
    FoldOptions,
    Gates,
    ReportOptions,
    SensitivityOptions,
    VerifyOptions,
)
from mobileone_cli.report import Report, report_sources
from mobileone_cli.results import (
    ArtifactCheck,
    ExportResult,
    ManifestCheck,
    ModelSummary,
    SensitivityReport,
)
from mobileone_cli.synthetic import make_checkpoint, make_repvit_checkpoint

Progress = pipeline.Progress
DEMO_SEED = 0
DEMO_FAMILIES = ("mobileone", "repvit")
"""What `demo --family` builds: a MobileOne S0 (Apple layout) or a RepViT m0_9 (timm's)."""


def _quiet(message: str) -> None:
    """The progress callback of a caller that wants none."""


def inspect(path: Path, *, ema: bool = False) -> ModelSummary:
    """Layout, variant and architecture of a checkpoint, without folding it."""
    return pipeline.summarize(load_checkpoint(path, ema=ema))


def fold(options: FoldOptions, *, progress: Progress = _quiet) -> ExportResult:
    """Load, fold, prove and (when the proof holds) write a folded safetensors file."""
    return pipeline.export(options.as_export(), progress=progress)


def export(options: ExportOptions, *, progress: Progress = _quiet) -> ExportResult:
    """Fold and prove the source, then write and prove every target; all or nothing."""
    return pipeline.export(options, progress=progress)


def verify(options: VerifyOptions, *, progress: Progress = _quiet) -> ArtifactCheck:
    """Prove an artifact of any target against the train-time checkpoint it came from."""
    return pipeline.verify_artifact(options, progress=progress)


def verify_bundle(manifest: Path, *, against: Path | None = None, rtol: float | None = None,
                  gates: Gates | None = None, progress: Progress = _quiet) -> ManifestCheck:
    """Check every hash of a bundle and, given its checkpoint, re-prove every artifact."""
    return pipeline.verify_bundle(manifest, against=against, rtol=rtol, gates=gates or Gates(),
                                  progress=progress)


def report(options: ReportOptions) -> Report:
    """Params, MACs and latency of each source, train-time against folded."""
    return report_sources(options, on_device=timing_backend)


def sensitivity(options: SensitivityOptions) -> SensitivityReport:
    """Rank the folded layers by what int8 weights cost each alone (`report --sensitivity`)."""
    return sensitivity_report(options)


def demo(output_dir: Path, *, family: str = "mobileone",
         progress: Progress = _quiet) -> ExportResult:
    """Generate a seeded train-time checkpoint (the tests' generator), then fold it."""
    if family not in DEMO_FAMILIES:
        raise UsageError(f"unknown family '{family}'", hint=f"choose {' or '.join(DEMO_FAMILIES)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    if family == "repvit":
        progress("building a seeded RepViT m0_9 checkpoint")
        checkpoint = make_repvit_checkpoint(output_dir / "repvit_m0_9_train.pth", seed=DEMO_SEED,
                                            wrapper="model")
        output = output_dir / "repvit_m0_9.safetensors"
    else:
        progress("building a seeded S0 checkpoint")
        checkpoint = make_checkpoint(output_dir / "mobileone_s0_train.pth", variant="s0",
                                     seed=DEMO_SEED, wrapper="state_dict")
        output = output_dir / "mobileone_s0.safetensors"
    return fold(FoldOptions(checkpoint=checkpoint, output=output, force=True), progress=progress)

"""The tool's Python API: one function per job, each returning a frozen result.

The CLI turns options into the options objects here, calls one function and
renders the result; Python users call the same functions. Nothing here prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli import __version__
from mobileone_cli.errors import EXIT_OK, EXIT_VERIFICATION_FAILED
from mobileone_cli.export import Artifact
from mobileone_cli.validation import check_folded_finite, check_reference_finite
from mobileone_cli.variants import ArchitectureSpec
from mobileone_cli.verify import DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, Verification

if TYPE_CHECKING:
    import torch

    from mobileone_cli.checkpoint import LoadedCheckpoint
    from mobileone_cli.verify import ReferenceRun

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class StageSummary:
    name: str
    blocks: int
    out_channels: int
    conv_branches: int
    stride: int
    se_blocks: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ParamCounts:
    train: int
    fused: int

    def to_dict(self) -> dict[str, int]:
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
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
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
class FoldOptions:
    checkpoint: Path
    output: Path
    rtol: float | None = None
    """None: the default tolerance, max(1e-4, 10x the fp32 noise floor)."""
    inputs_dir: Path | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    layout: str | None = None
    """Key naming of the output; the source's own layout when None."""
    ema: bool = False
    force: bool = False
    dtype: str = "float32"
    """dtype of the written weights; the fold itself is always float64."""


@dataclass(frozen=True)
class FoldResult:
    summary: ModelSummary
    output_layout: str
    verification: Verification
    outputs: tuple[Artifact, ...] = field(default=())
    checked: tuple[Artifact, ...] = field(default=())
    """A written file that failed its re-read check (and was therefore not kept)."""

    @property
    def exit_code(self) -> int:
        passed = self.verification.passed and not self.checked
        return EXIT_OK if passed else EXIT_VERIFICATION_FAILED

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary.to_dict()
        return {
            "variant": summary.pop("variant"),
            "layout": summary.pop("layout"),
            "output_layout": self.output_layout,
            "num_classes": summary.pop("num_classes"),
            "params": summary.pop("params"),
            "verification": self.verification.to_dict(),
            "outputs": [artifact.to_dict() for artifact in self.outputs],
            "failed_outputs": [artifact.to_dict() for artifact in self.checked],
            **summary,
        }


def inspect_checkpoint(path: Path, *, ema: bool = False) -> ModelSummary:
    """Layout, variant and architecture of a checkpoint, without folding it."""
    from mobileone_cli.checkpoint import load_checkpoint

    return summarize(load_checkpoint(path, ema=ema))


def summarize(loaded: LoadedCheckpoint) -> ModelSummary:
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
        params=ParamCounts(train=count_params(loaded.state), fused=count_fused_params(spec)),
    )


def stage_summaries(spec: ArchitectureSpec) -> tuple[StageSummary, ...]:
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


def count_params(state: dict[str, torch.Tensor]) -> int:
    """Learnable parameters: BatchNorm running statistics are buffers, not parameters."""
    return sum(value.numel() for key, value in state.items() if not key.endswith(_BUFFER_SUFFIXES))


def count_fused_params(spec: ArchitectureSpec) -> int:
    from mobileone_cli.model import expected_shapes

    total = 0
    for shape in expected_shapes(spec.folded()).values():
        count = 1
        for size in shape:
            count *= size
        total += count
    return total


def fold_checkpoint(options: FoldOptions) -> FoldResult:
    """Load, fold, prove and (when the proof holds) write a folded safetensors file."""
    from mobileone_cli.checkpoint import load_checkpoint
    from mobileone_cli.export import safetensors as safetensors_export
    from mobileone_cli.files import (
        check_destination,
        replace_path,
        sha256_path,
        size_of,
        staging_path,
    )

    # issue 9: every destination check before any work; a folded file is at most the source's size.
    check_destination(options.output, kind="file", force=options.force,
                      inputs=(options.checkpoint, options.inputs_dir),
                      expected_bytes=size_of(options.checkpoint))
    loaded = load_checkpoint(options.checkpoint, ema=options.ema)
    folded = fold_and_verify(loaded, rtol=options.rtol, inputs_dir=options.inputs_dir,
                             input_size=options.input_size)
    verification = folded.verification
    output_layout = options.layout or loaded.layout
    summary = summarize(loaded)
    if not verification.passed:
        return FoldResult(summary=summary, output_layout=output_layout, verification=verification)
    metadata = file_metadata(loaded, layout=output_layout, input_size=options.input_size,
                             verification=verification)
    with staging_path(options.output) as staged:
        written = safetensors_export.export(folded, staged, layout=output_layout,
                                            metadata=metadata, dtype=options.dtype,
                                            rtol=options.rtol)
        artifact = Artifact(path=options.output, format="safetensors",
                            sha256=sha256_path(staged), bytes=size_of(staged),
                            verification=written)
        if not written.passed:
            return FoldResult(summary=summary, output_layout=output_layout,
                              verification=verification, checked=(artifact,))
        replace_path(staged, options.output)
    return FoldResult(summary=summary, output_layout=output_layout, verification=verification,
                      outputs=(artifact,))


@dataclass(frozen=True)
class FoldedModel:
    """A checkpoint folded and proven: the folded state and the reference it was checked on."""

    loaded: LoadedCheckpoint
    state: dict[str, torch.Tensor]
    reference: ReferenceRun
    verification: Verification

    def build(self) -> torch.nn.Module:
        from mobileone_cli.model import build_model

        return build_model(self.loaded.spec.folded(), self.state)


def fold_and_verify(
    loaded: LoadedCheckpoint,
    *,
    rtol: float | None = None,
    inputs_dir: Path | None = None,
    input_size: int = DEFAULT_INPUT_SIZE,
) -> FoldedModel:
    from mobileone_cli.fold import fold_state
    from mobileone_cli.model import build_model
    from mobileone_cli.verify import (
        compare,
        default_inputs,
        image_inputs,
        run_reference,
        torch_candidate,
    )

    folded_state = fold_state(loaded.spec, loaded.state)
    check_folded_finite(folded_state)  # issue 9: extreme inputs are bad input, not a fold bug
    batches = image_inputs(inputs_dir, size=input_size) if inputs_dir else default_inputs(input_size)
    reference = run_reference(loaded.spec, loaded.state, batches)
    check_reference_finite(reference.outputs_fp32)
    folded_model = build_model(loaded.spec.folded(), folded_state)
    verification = compare(reference, torch_candidate(folded_model), rtol=rtol)
    return FoldedModel(loaded=loaded, state=folded_state, reference=reference,
                       verification=verification)


def file_metadata(
    loaded: LoadedCheckpoint, *, layout: str, input_size: int, verification: Verification
) -> dict[str, str]:
    """What a folded file says about itself; every value deterministic for the same input."""
    figures = {
        key: _significant(value)
        for key, value in verification.to_dict().items()
        if isinstance(value, float)
    }
    return {
        "format": "pt",
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


def _significant(value: float) -> float:
    """Three significant digits: thread scheduling may move the last bits of an fp32 sum."""
    return float(f"{value:.3g}")


DEMO_SEED = 0


def run_demo(output_dir: Path) -> FoldResult:
    """Generate the seeded train-time S0 checkpoint the tests use, then fold it."""
    from mobileone_cli.synthetic import make_checkpoint

    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(output_dir / "mobileone_s0_train.pth", variant="s0",
                                 seed=DEMO_SEED, wrapper="state_dict")
    return fold_checkpoint(FoldOptions(checkpoint=checkpoint,
                                       output=output_dir / "mobileone_s0.safetensors", force=True))

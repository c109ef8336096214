"""All terminal output: rich tables on stdout, messages and progress on stderr.

Data (tables, JSON, written paths) goes to stdout, everything else to stderr.
User-supplied text is rendered with markup off, so a path like `[s0].pth`
prints as itself. Colour follows rich's conventions (NO_COLOR, non-terminals).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from mobileone_cli.errors import printable
from mobileone_cli.results import (
    MAC_CONVENTION,
    Artifact,
    ArtifactCheck,
    ExportResult,
    ManifestCheck,
    ModelSummary,
    PrecisionCost,
    SensitivityReport,
    Verification,
)

if TYPE_CHECKING:
    from mobileone_cli.report import Report, SourceReport


class Terminal:
    """The one owner of terminal output: tables on stdout, messages and progress on stderr."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.failure: tuple[str, str | None] | None = None
        """The first error printed, as (message, hint): --json output carries it too."""
        # --quiet and --json: tables and notes go nowhere; errors (stderr) and JSON
        # (sys.stdout) still show.
        self.out = Console(highlight=False, soft_wrap=True,
                           file=io.StringIO() if quiet or json_mode else None)
        # soft_wrap: an error is one line however long, so CI logs and greps keep it whole.
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    # -- messages -------------------------------------------------------------
    def error(self, message: str, hint: str | None = None) -> None:
        """One `error:` line and one `hint:` line, whatever a path or key in them holds."""
        if self.failure is None:
            self.failure = (message, hint)
        self.err.print(Text.assemble(("error: ", "bold red"), printable(message)))
        if hint:
            self.err.print(Text.assemble(("hint: ", "yellow"), printable(hint)))

    def info(self, message: str) -> None:
        """A note on stderr, unless quiet or printing JSON."""
        if not (self.quiet or self.json_mode):
            self.err.print(Text(message, style="dim"))

    def next_steps(self, commands: tuple[str, ...]) -> None:
        """Commands to try next, on stderr: a guide for people, not data for pipelines."""
        if self.quiet or self.json_mode:
            return
        self.err.print(Text("next, try:", style="bold"))
        for command in commands:
            self.err.print(Text(f"  $ {command}"))

    @contextmanager
    def progress(self, description: str) -> Iterator[Callable[[str], None]]:
        """A spinner on a terminal; nothing in --json or --quiet mode or when piped.

        Yields a callback that replaces the spinner's text as the work moves on.
        """
        if self.quiet or self.json_mode or not self.err.is_terminal:
            yield lambda message: None
            return
        with self.err.status(Text(description)) as status:
            yield lambda message: status.update(Text(message))

    # -- data -----------------------------------------------------------------
    def emit_json(self, payload: dict[str, Any]) -> None:
        """Exactly one JSON object on stdout."""
        sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()

    def model_summary(self, summary: ModelSummary) -> None:
        """Layout, variant, architecture table and parameter counts of a checkpoint."""
        classes = "headless backbone" if summary.num_classes is None else f"{summary.num_classes} classes"
        state = "already folded" if summary.already_folded else "train-time"
        self.out.print(Text(f"{summary.source}", style="bold"))
        self.out.print(Text(
            f"  {summary.variant.upper()} · {summary.layout} layout · {state} · {classes} · "
            f"{summary.source_dtype}"
        ))
        if summary.container or summary.stripped_prefixes or summary.skipped_extras:
            notes = []
            if summary.container:
                notes.append(f"weights under '{summary.container}'")
            if summary.stripped_prefixes:
                notes.append("stripped " + ", ".join(f"'{p}'" for p in summary.stripped_prefixes))
            if summary.skipped_extras:
                notes.append("skipped " + ", ".join(summary.skipped_extras))
            self.out.print(Text("  " + "; ".join(notes), style="dim"))
        table = Table(title=None, show_edge=False, pad_edge=False)
        for column in ("stage", "blocks", "out channels", "conv branches", "stride", "SE blocks"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for stage in summary.stages:
            table.add_row(stage.name, str(stage.blocks), str(stage.out_channels),
                          str(stage.conv_branches) if stage.conv_branches else "folded",
                          str(stage.stride), str(stage.se_blocks))
        self.out.print(table)
        self.out.print(Text(
            f"  params: {_millions(summary.params.train)} train-time → "
            f"{_millions(summary.params.fused)} folded"
        ))

    def verification(self, title: str, verification: Verification) -> None:
        """The figures of one proof against its tolerance."""
        table = Table(title=Text(title, style="bold"), title_justify="left", show_edge=False)
        table.add_column("figure")
        table.add_column("value", justify="right")
        table.add_row("max |Δ|", f"{verification.max_abs_diff:.3g}")
        table.add_row("max relative |Δ|", f"{verification.max_rel_diff:.3g}")
        table.add_row("tolerance (rtol)", f"{verification.rtol:.3g}")
        table.add_row("reference", verification.reference)
        table.add_row("fp32 noise floor", f"{verification.noise_floor:.3g}")
        ratio = verification.floor_ratio
        table.add_row("error / floor", "n/a" if ratio is None else f"{ratio:.2f}x")
        table.add_row("cosine similarity", f"{verification.cosine_similarity:.8f}")
        if verification.top1_agreement is not None:
            table.add_row("top-1 agreement", f"{verification.top1_agreement:.1%}")
        weights = verification.weights
        if weights is not None:
            table.add_row(f"stored weights ({weights.scheme})",
                          f"{weights.layers} layers, worst {weights.worst_layer} "
                          f"{weights.worst_error:.3g} steps (limit {weights.limit:g})")
            if weights.worst_bias:
                table.add_row("stored biases", f"worst {weights.worst_bias} "
                              f"{weights.worst_bias_error:.3g} of its largest |bias| "
                              f"(limit {weights.bias_limit:g})")
        verdict = Text("PASSED", style="bold green") if verification.passed else Text(
            "FAILED", style="bold red")
        table.add_row("verdict", verdict)
        self.out.print(table)
        # The rule under the table, not in its cell: a long rule would widen every row.
        self.out.print(Text(f"  tolerance: {verification.tolerance_rule}", style="dim"))
        self.out.print(Text("  inputs: " + "; ".join(verification.inputs), style="dim"))

    def artifacts(self, artifacts: tuple[Artifact, ...]) -> None:
        """One `wrote ...` line per written artifact."""
        for artifact in artifacts:
            self.out.print(Text.assemble(
                ("wrote ", "green"), str(artifact.path),
                f"  ({artifact.format}, {_size(artifact.bytes)}, sha256 {artifact.sha256[:12]}…)",
            ))

    def cost(self, title: str, cost: PrecisionCost) -> None:
        """What a reduced-precision artifact gives up against the fp32 model, and its gates."""
        table = Table(title=Text(title, style="bold"), title_justify="left", show_edge=False)
        table.add_column("figure")
        table.add_column("value", justify="right")
        if cost.top1_agreement is not None:
            table.add_row("top-1 agreement", f"{cost.top1_agreement:.1%}  "
                          f"(gate --min-agreement {cost.min_agreement:g})")
        if cost.top5_agreement is not None:
            table.add_row("top-5 agreement", f"{cost.top5_agreement:.1%}")
        table.add_row("mean cosine", f"{cost.mean_cosine:.6f}  (gate --min-cosine "
                      f"{cost.min_cosine:g})")
        table.add_row("worst cosine", f"{cost.worst_cosine:.6f}")
        table.add_row("max relative |Δ|", f"{cost.max_rel_diff:.3g}")
        if cost.reference_top1 is not None and cost.artifact_top1 is not None:
            table.add_row("top-1 accuracy", f"{cost.reference_top1:.1%} fp32 → "
                          f"{cost.artifact_top1:.1%} ({cost.artifact_top1 - cost.reference_top1:+.1%})")
        table.add_row("samples", str(cost.samples))
        verdict = Text("within the gates", style="bold green") if cost.passed else Text(
            "OVER THE GATES", style="bold red")
        table.add_row("verdict", verdict)
        self.out.print(table)

    def export_result(self, result: ExportResult) -> None:
        """The fold's proof, each artifact's proof and cost, what was written or why not."""
        self.model_summary(result.summary)
        self.out.print()
        fold = result.fold_verification
        if result.summary.already_folded:
            self.info("the source is already folded: nothing to fold; artifacts are proven "
                      "against the source itself")
        self.verification("fold verification: folded vs " + fold.reference, fold)
        for artifact in result.artifacts:
            if artifact.verification is not None:
                self.out.print()
                self.verification(f"{artifact.format}: {artifact.path.name} vs "
                                  f"{artifact.verification.reference} (conversion proof)",
                                  artifact.verification)
            compression = artifact.declared.compression if artifact.declared else None
            if compression is not None:
                kept = (f"; kept float: {', '.join(compression.kept_float)}"
                        if compression.kept_float else "")
                calibrated = (f"; calibrated on {compression.calibration['count']} images"
                              if compression.calibration else "")
                self.info(f"{artifact.format} --quantize {compression.mode}: weights "
                          f"{compression.weights}; activations {compression.activations}"
                          f"{calibrated}{kept}")
            if artifact.cost is not None:
                self.out.print()
                self.cost(f"{artifact.format}: cost of {artifact.cost.precision} against the fp32 "
                          "train-time model", artifact.cost)
        for target, reason in result.skipped:
            self.info(f"skipped --to {target}: {reason}")
        for gate in result.gates:
            if gate.passed:
                self.info(f"gate --{gate.name.replace('_', '-')} passed: {gate.subject} within "
                          "its limit")
        if result.written:
            self.artifacts(result.artifacts)
            if result.bundle is not None:
                self.out.print(Text.assemble(("wrote ", "green"), str(result.bundle / "manifest.json"),
                                             " and summary.md"))
            return
        self._explain_failure(result)

    def _explain_failure(self, result: ExportResult) -> None:
        fold = result.fold_verification
        if not fold.passed:
            self.error(
                f"the folded model differs from the train-time model by {fold.max_rel_diff:.3g} "
                f"(relative), beyond the tolerance {fold.rtol:.3g}; nothing was written",
                hint="this is a fold bug or a checkpoint the tool misreads; please report it",
            )
            return
        unproven = [a.format for a in result.artifacts
                    if a.verification is not None and not a.verification.passed]
        if unproven:
            self.error(f"{', '.join(unproven)} does not compute what the folded model computes; "
                       "nothing was written",
                       hint="run with --json for every figure; a converter bug, please report it")
            return
        costly = [a for a in result.artifacts if a.cost is not None and not a.cost.passed]
        if costly:
            first = costly[0].cost
            assert first is not None
            quantized = any(a.declared is not None and a.declared.compression is not None
                            for a in costly)
            keep = ("keep the most sensitive layers float (--keep-float N, see `mobileone report "
                    "--sensitivity`), choose a milder mode" if quantized else
                    "keep full precision (--precision fp32 for Core ML, --dtype float32 for "
                    "safetensors)")
            self.error(f"{first.precision} costs more than the gates allow "
                       f"({'; '.join(first.failures())}); nothing was written",
                       hint=f"{keep}, or lower --min-cosine/--min-agreement (random or "
                            "synthetic weights can legitimately cost this much)")
            return
        failed_gates = [gate for gate in result.gates if not gate.passed]
        self.error("; ".join(gate.message() for gate in failed_gates) + "; nothing was written",
                   hint="raise the limit, or choose a smaller variant")

    def manifest_check(self, check: ManifestCheck) -> None:
        """Each file of a bundle: its hash and, when re-proven, its figures."""
        table = Table(title=Text(f"bundle {check.manifest}", style="bold"), title_justify="left",
                      show_edge=False)
        for column in ("file", "sha256", "numbers"):
            table.add_column(column)
        numbers = {v.artifact.path.name: v for v in check.verifications}
        for entry in check.hashes:
            verified = numbers.get(Path(entry.path).name)
            table.add_row(Text(entry.path),
                          Text("ok" if entry.passed else
                               ("missing" if entry.actual is None else "CHANGED"),
                               style="green" if entry.passed else "bold red"),
                          "-" if verified is None or verified.artifact.verification is None else Text(
                              f"{verified.artifact.verification.max_rel_diff:.3g} "
                              + ("ok" if verified.passed else "FAILED"),
                              style="green" if verified.passed else "bold red"))
        self.out.print(table)
        for problem in check.problems:
            self.err.print(Text.assemble(("problem: ", "bold red"), printable(problem)))
        if not check.passed:
            self.error(f"the bundle at {check.manifest.parent} does not hold what its manifest says",
                       hint="rebuild it with `mobileone export --to all`")

    def artifact_check(self, check: ArtifactCheck) -> None:
        """One artifact's proof (and cost) against its checkpoint."""
        assert check.artifact.verification is not None
        self.verification(f"{check.artifact.format}: {check.artifact.path} vs {check.against}",
                          check.artifact.verification)
        if check.artifact.cost is not None:
            self.cost(f"cost of {check.artifact.cost.precision}", check.artifact.cost)
        if not check.passed:
            self.error(f"{check.artifact.path} does not reproduce {check.against}",
                       hint="the artifact was altered, or exported from another checkpoint")

    def sensitivity(self, report: SensitivityReport) -> None:
        """The folded layers, worst first, by the error of quantizing each alone."""
        self.out.print(Text(f"{report.source} · {report.variant.upper()} · each layer alone with "
                            f"{report.scheme} weights · {report.images} images", style="bold"),
                       soft_wrap=True)
        table = Table(show_edge=False, pad_edge=False)
        widest = max((len(row.layer) for row in report.layers), default=5)
        for column in ("rank", "layer", "output error", "top-1 agreement", "outlier (std devs)"):
            # A layer name is what `--keep-float` takes: never cut it short.
            table.add_column(column, justify="left" if column == "layer" else "right",
                             min_width=widest if column == "layer" else None)
        for rank, row in enumerate(report.layers, start=1):
            agreement = "-" if row.top1_agreement is None else f"{row.top1_agreement:.1%}"
            table.add_row(str(rank), row.layer, f"{row.relative_error:.3g}", agreement,
                          f"{row.outlier:.1f}")
        self.out.print(table)
        self.info("output error: ||out_q - out||² / ||out||² with only that layer quantized; "
                  "`export --keep-float N` keeps the first N float")

    def report(self, report: Report) -> None:
        """One row per source: params and MACs train → fused, latency per runtime, file size."""
        height, width = report.size
        heading = f"MACs: {MAC_CONVENTION} · input {report.batch} x 3 x {height} x {width}"
        if report.latency_measured:  # a thread count describes timing; none without it
            heading += f" · {report.threads} thread{'' if report.threads == 1 else 's'}"
        self.out.print(Text(heading, style="bold"), soft_wrap=True)
        table = Table(show_edge=False, pad_edge=False)
        for column in ("source", "variant", "params (M)", "MACs (M)"):
            table.add_column(column, justify="right" if "(M)" in column else "left")
        if report.latency_measured:
            table.add_column("model · runtime")
            table.add_column("ms median / p90", justify="right")
            table.add_column("images/s", justify="right")
            table.add_column("speed-up", justify="right")
        table.add_column("file", justify="right")
        for row in report.rows:
            cells = [Text(str(row.source)), Text(row.variant.upper()),
                     Text(_report_change(row, "params")), Text(_report_change(row, "macs"))]
            if report.latency_measured:
                cells += [
                    Text("\n".join(f"{item.model} · {item.runtime}" for item in row.latency)),
                    Text("\n".join(f"{item.median_ms:.2f} / {item.p90_ms:.2f}"
                                   for item in row.latency)),
                    Text("\n".join(f"{item.images_per_second:,.1f}" for item in row.latency)),
                    Text("—" if row.speedup is None else f"{row.speedup:.2f}x"),
                ]
            cells.append(Text(_size(row.file_bytes)))
            table.add_row(*cells)
        self._print_whole(table)
        if report.latency_measured:
            self.out.print(Text(
                f"latency: median and p90 of {report.runs} runs after {report.warmup} warm-up "
                f"runs; speed-up = train-time / folded median in torch eager", style="dim"),
                soft_wrap=True)
            self.out.print(Text(_machine_line(report), style="dim"), soft_wrap=True)
            if report.machine_was_busy and not self.quiet:
                self.err.print(Text(
                    f"warning: the machine was busy (load average {report.load_average:.1f} on "
                    f"{report.cpus} CPUs); latency figures are unreliable", style="yellow"))
        for row in report.rows:
            if row.fused_stages is not None:
                self.out.print()
                self.report_stages(row)

    def report_stages(self, row: SourceReport) -> None:
        """Params, MACs and output shape of the stem, each stage and the head of one source."""
        self.out.print(Text(f"{row.source} by stage", style="bold"), soft_wrap=True)
        table = Table(show_edge=False, pad_edge=False)
        for column in ("stage", "output (C x H x W)", "params (M)", "MACs (M)"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        fused = row.fused_stages or ()
        train = row.train_stages or (None,) * len(fused)
        for before, after in zip(train, fused, strict=True):
            params = _report_pair(None if before is None else before.params, after.params)
            macs = _report_pair(None if before is None else before.macs, after.macs, macs=True)
            table.add_row(after.name, " x ".join(map(str, after.output_shape[1:])), params, macs)
        self._print_whole(table)

    def _print_whole(self, table: Table) -> None:
        """Piped output is as wide as the table needs: rich would wrap it at 80 columns."""
        if self.out.is_terminal:
            self.out.print(table)
            return
        unbounded = self.out.options.update_width(1 << 16)
        width = max(self.out.width, Measurement.get(self.out, unbounded, table).maximum)
        Console(file=self.out.file, width=width, highlight=False, soft_wrap=False).print(table)


def _machine_line(report: Report) -> str:
    """What the latency figures were measured on: runtime versions and the CPU."""
    versions = " · ".join(f"{name} {version}" for name, version in report.versions.items())
    cpu = report.cpu_model or "unknown CPU"
    return f"measured with {versions} on {cpu} ({report.cpus} CPUs available)"


def _report_change(row: SourceReport, field: str) -> str:
    """`train → fused` of one Complexity field; the fused figure alone for folded files."""
    before = getattr(row.train, field) if row.train else None
    after = getattr(row.fused, field) if row.fused else None
    if after is None:
        return "n/a"
    return _report_pair(before, after, macs=field == "macs")


def _report_pair(before: int | None, after: int, *, macs: bool = False) -> str:
    def show(count: int) -> str:
        millions = count / 1e6
        # MACs in whole millions as the paper prints them; one decimal for small inputs.
        if macs:
            return f"{millions:,.0f}" if millions >= 100 else f"{millions:.1f}"
        return f"{millions:.2f}" if count >= 10_000 else f"{millions:.3f}"

    return show(after) if before is None else f"{show(before)} → {show(after)}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB" if count >= 1 << 20 else f"{count / 1024:.1f} KiB"

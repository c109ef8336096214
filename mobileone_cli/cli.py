"""The `mobileone` command: parse options, call one API function, render its result.

Only the standard library, click and rich are imported here at start-up, so
`mobileone --help` never waits for torch. The group's `invoke` is the one place
where a `MobileOneError` becomes `error: ...` / `hint: ...` and an exit code.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import click

from mobileone_cli import __version__
from mobileone_cli.console import Terminal
from mobileone_cli.errors import MobileOneError
from mobileone_cli.layouts import LAYOUTS
from mobileone_cli.verify import AUTO_TOLERANCE, DEFAULT_INPUT_SIZE

EXIT_INTERRUPTED = 130

EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
EXISTING_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


class MobileOneGroup(click.Group):
    """Runs a command and turns the core's typed errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MobileOneError as error:
            if ctx.params.get("debug"):
                traceback.print_exc()
            Terminal().error(error.message, error.hint)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            Terminal().error("interrupted; nothing was written")
            ctx.exit(EXIT_INTERRUPTED)


def json_option(function: Any) -> Any:
    return click.option("--json", "json_mode", is_flag=True,
                        help="Print exactly one JSON object on stdout and nothing else there.")(function)


def _silence_third_party() -> None:
    """Hide the chatter of torch, coremltools and onnx (version warnings, progress bars)."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("coremltools", "torch", "onnx", "onnxruntime", "onnxsim"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=MobileOneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mobileone")
@click.option("--debug", is_flag=True, help="Show tracebacks and third-party warnings.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fold train-time MobileOne checkpoints into verified, deployable models.

    Reads Apple ml-mobileone, timm and OpenMMLab mmpretrain checkpoints.
    Exit codes: 0 success, 1 bad input, 2 usage, 3 verification failed,
    4 export failed, 130 interrupted.
    """
    if not debug:
        _silence_third_party()


@main.command("inspect")
@click.argument("checkpoint", type=EXISTING_FILE)
@click.option("--ema", is_flag=True, help="Read the EMA copy of the weights.")
@json_option
def inspect_command(checkpoint: Path, ema: bool, json_mode: bool) -> None:
    """Show layout, variant, architecture and parameters of CHECKPOINT."""
    from mobileone_cli.api import inspect_checkpoint

    terminal = Terminal(json_mode=json_mode)
    with terminal.progress("reading checkpoint"):
        summary = inspect_checkpoint(checkpoint, ema=ema)
    if json_mode:
        terminal.emit_json(summary.to_dict())
    else:
        terminal.model_summary(summary)


@main.command("fold")
@click.argument("checkpoint", type=EXISTING_FILE)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the folded .safetensors file.")
@click.option("--rtol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Largest max|folded - train| / max|train| that passes verification "
                   f"[default: {AUTO_TOLERANCE}].")
@click.option("--inputs", "inputs_dir", type=EXISTING_FOLDER,
              help="Verify on your own images (a folder of jpg/png) instead of seeded noise.")
@click.option("--input-size", type=click.IntRange(min=32), default=DEFAULT_INPUT_SIZE,
              show_default=True, help="Side of the square verification inputs.")
@click.option("--layout", type=click.Choice(LAYOUTS),
              help="Key naming of the output (default: the checkpoint's own).")
@click.option("--ema", is_flag=True, help="Fold the EMA copy of the weights.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@json_option
@click.pass_context
def fold_command(ctx: click.Context, checkpoint: Path, output: Path, rtol: float | None,
                 inputs_dir: Path | None, input_size: int, layout: str | None, ema: bool,
                 force: bool, json_mode: bool) -> None:
    """Fold CHECKPOINT, prove it equivalent, and write safetensors."""
    from mobileone_cli.api import FoldOptions, fold_checkpoint

    options = FoldOptions(checkpoint=checkpoint, output=output, rtol=rtol, inputs_dir=inputs_dir,
                          input_size=input_size, layout=layout, ema=ema, force=force)
    terminal = Terminal(json_mode=json_mode)
    with terminal.progress("folding and verifying"):
        result = fold_checkpoint(options)
    if json_mode:
        terminal.emit_json(result.to_dict())
    else:
        terminal.fold_result(result)
    ctx.exit(result.exit_code)


@main.command("demo")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("mobileone-demo"), show_default=True,
              help="Folder for the generated checkpoint and the folded model.")
@json_option
@click.pass_context
def demo_command(ctx: click.Context, output_dir: Path, json_mode: bool) -> None:
    """Build a seeded S0 checkpoint, fold and verify it: the whole job, no files needed."""
    from mobileone_cli.api import run_demo

    terminal = Terminal(json_mode=json_mode)
    with terminal.progress("building a seeded S0 checkpoint, folding and verifying"):
        result = run_demo(output_dir)
    if json_mode:
        terminal.emit_json(result.to_dict())
    else:
        terminal.info(f"generated a train-time S0 checkpoint at {result.summary.source}")
        terminal.fold_result(result)
    ctx.exit(result.exit_code)


@main.command("report")
@click.argument("sources", nargs=-1, required=True, type=EXISTING_FILE)
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time each model (torch eager; onnxruntime for .onnx files).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per timed inference.")
@click.option("--size", type=(click.IntRange(min=32), click.IntRange(min=32)), default=(224, 224),
              show_default=True, metavar="H W", help="Input height and width, for MACs and latency.")
@click.option("--threads", type=click.IntRange(min=1),
              help="Intra-op threads of torch and onnxruntime  [default: torch's current count]")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per model; the report gives their median and p90.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed runs before timing.")
@click.option("--per-stage", is_flag=True, default=False,
              help="Also break params and MACs down by stage.")
@json_option
@click.pass_context
def report_command(ctx: click.Context, sources: tuple[Path, ...], latency: bool, batch: int,
                   size: tuple[int, int], threads: int | None, runs: int, warmup: int,
                   per_stage: bool, json_mode: bool) -> None:
    """Measure params, MACs and latency of SOURCES, train-time vs folded.

    Each SOURCE is a train-time checkpoint, a folded .safetensors file or an
    .onnx export. MACs count the conv and linear layers (the paper's FLOPs).
    """
    from mobileone_cli.report import ReportOptions, report_sources

    options = ReportOptions(sources=sources, latency=latency, batch=batch, size=size,
                            threads=threads, runs=runs, warmup=warmup, per_stage=per_stage)
    terminal = Terminal(json_mode=json_mode)
    with terminal.progress("measuring params, MACs and latency"):
        result = report_sources(options)
    if json_mode:
        terminal.emit_json(result.to_dict())
    else:
        terminal.report(result)
    ctx.exit(result.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])

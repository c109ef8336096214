"""The `mobileone` command: parse options, call one API function, render its result.

Only the standard library, click, `errors` and `defaults` (the constants the
help shows) are imported at start-up, so `mobileone --help` never waits for torch,
rich or our own dataclasses: `api` (which pulls torch), `console` (rich), `options`,
`validation` and `quiet` are bound at module level but imported on first use
(`_Deferred`). The group's `invoke` is the one place where a
`MobileOneError` becomes `error: ...` / `hint: ...` and an exit code.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import shlex
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from mobileone_cli import __version__
from mobileone_cli.defaults import (
    ALL_LAYOUTS,
    AUTO_TOLERANCE,
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_METHOD,
    DEFAULT_INPUT_SIZE,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_COSINE,
    IMAGE_SUFFIXES,
    QUANTIZE_MODES,
    QUANTIZED_MIN_AGREEMENT,
    QUANTIZED_MIN_COSINE,
    SENSITIVITY_MODES,
    TARGETS,
)
from mobileone_cli.errors import EXIT_INTERRUPTED, EXIT_OK, MobileOneError, printable


class _Deferred:
    """A module of ours, imported on its first attribute access (`importlib.import_module`).

    For the modules `--help` does not need: `api` (torch), `console` (rich), and the light
    ones that still cost start-up time (`options`' dataclasses, `validation`, `quiet`).
    An import cut short by Ctrl-C is retried on the next access, as a plain import is.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._when_imported: Callable[[], None] | None = None

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self._name)
        if self._when_imported is not None:
            hook, self._when_imported = self._when_imported, None
            hook()
        return getattr(module, attribute)

    def when_imported(self, hook: Callable[[], None]) -> None:
        """Call `hook` once, right after the module's first import."""
        self._when_imported = hook

    def constructor(self, name: str) -> Callable[..., Any]:
        """A stand-in for the class `name` of the module: calling it imports and calls it."""
        def construct(*args: Any, **kwargs: Any) -> Any:
            return getattr(self, name)(*args, **kwargs)

        return construct


_api_module = _Deferred("mobileone_cli.api")

if TYPE_CHECKING:
    from mobileone_cli import api, console, quiet, validation
    from mobileone_cli.options import (
        CoreMLOptions,
        ExportOptions,
        FoldOptions,
        Gates,
        LiteRTOptions,
        OnnxOptions,
        QuantizeOptions,
        ReportOptions,
        SafetensorsOptions,
        SensitivityOptions,
        VerifyOptions,
    )
else:
    api = _api_module
    console = _Deferred("mobileone_cli.console")
    quiet = _Deferred("mobileone_cli.quiet")
    validation = _Deferred("mobileone_cli.validation")
    # The options classes are only built once a command runs; every name imported from
    # `options` above must be listed here too.
    _options = _Deferred("mobileone_cli.options")
    CoreMLOptions = _options.constructor("CoreMLOptions")
    ExportOptions = _options.constructor("ExportOptions")
    FoldOptions = _options.constructor("FoldOptions")
    Gates = _options.constructor("Gates")
    LiteRTOptions = _options.constructor("LiteRTOptions")
    OnnxOptions = _options.constructor("OnnxOptions")
    QuantizeOptions = _options.constructor("QuantizeOptions")
    ReportOptions = _options.constructor("ReportOptions")
    SafetensorsOptions = _options.constructor("SafetensorsOptions")
    SensitivityOptions = _options.constructor("SensitivityOptions")
    VerifyOptions = _options.constructor("VerifyOptions")

DEMO_CHECKPOINT = "mobileone-demo/mobileone_s0_train.pth"
# Two or three real examples ending each command's --help, in the order a newcomer runs them:
# after `mobileone demo`, each works as written (tests/test_contract.py parses every one).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "demo": ("mobileone demo",
             "mobileone demo --family repvit -o repvit-demo",
             "mobileone demo -o /tmp/mobileone-demo --json"),
    "inspect": (f"mobileone inspect {DEMO_CHECKPOINT}",
                f"mobileone inspect {DEMO_CHECKPOINT} --json"),
    "fold": (f"mobileone fold {DEMO_CHECKPOINT} -o s0.safetensors",
             f"mobileone fold {DEMO_CHECKPOINT} -o s0_timm.safetensors --layout timm",
             f"mobileone fold {DEMO_CHECKPOINT} -o s0_fp16.safetensors --dtype float16"),
    "export": (f"mobileone export {DEMO_CHECKPOINT} --to onnx -o s0.onnx",
               f"mobileone export {DEMO_CHECKPOINT} --to coreml --image-input -o s0.mlpackage",
               f"mobileone export {DEMO_CHECKPOINT} --to all -o dist --max-params 5M"),
    "verify": (f"mobileone verify s0.onnx --against {DEMO_CHECKPOINT}",
               f"mobileone verify --manifest dist/manifest.json --against {DEMO_CHECKPOINT}"),
    "report": (f"mobileone report {DEMO_CHECKPOINT} s0.onnx",
               f"mobileone report {DEMO_CHECKPOINT} --no-latency --per-stage",
               "mobileone report s0.onnx --threads 1 --runs 50"),
}


def examples(command: str) -> str:
    """The epilog of `command`'s --help: its examples, kept on their own lines (\\b)."""
    return "\b\nExamples:\n" + "\n".join(f"  $ {line}" for line in EXAMPLES[command])


_IMAGE_KINDS = "/".join(suffix.removeprefix(".") for suffix in IMAGE_SUFFIXES)
ARGUMENTS_KEY = "mobileone.arguments"
DEBUG_KEY = "mobileone.debug"
QUIET_KEY = "mobileone.quiet"
# `mobileone` with no command shows the help (click >= 8.2 raises this for it).
NO_ARGUMENTS_IS_HELP: tuple[type[Exception], ...] = tuple(
    error for error in (getattr(click.exceptions, "NoArgsIsHelpError", None),)
    if error is not None
)
DEPLOYMENT_TARGET_RANGE = ("iOS15-iOS18 or iOS26, macOS12-macOS15 or macOS26, "
                           "watchOS8-watchOS11 or watchOS26, tvOS15-tvOS18 or tvOS26")

EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


class SuffixedNumber(click.ParamType):
    """A count such as 5000000, 5e6, 5M or 300K."""

    name = "NUMBER"
    SUFFIXES: ClassVar[dict[str, float]] = {"k": 1e3, "m": 1e6, "g": 1e9}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        """The number `value` denotes, or a usage error naming the accepted forms."""
        text = str(value).strip().lower()
        scale = self.SUFFIXES.get(text[-1:], 1.0)
        try:
            number = float(text[:-1] if scale != 1.0 else text) * scale
        except ValueError:
            self.fail(f"{value!r} is not a number such as 5000000, 5e6 or 5M", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if number <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return number


NUMBER = SuffixedNumber()


# -- issue 9: parse-time checks; the logic is in validation.py -------------------------------
class FinitePositive(click.FloatRange):
    """A positive float; NaN and infinities are refused (NaN passes every range check)."""

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        """The checked value, or click's usage error carrying our message and hint."""
        number = super().convert(value, param, ctx)
        return _checked(validation.finite_number, number, param, ctx, option=_option(param))


class InputSize(click.IntRange):
    """An input side of at least 32 px whose reference run fits in the available memory."""

    def __init__(self) -> None:
        super().__init__(min=32)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        """The checked value, or click's usage error carrying our message and hint."""
        size = super().convert(value, param, ctx)
        return _checked(validation.check_input_size, size, param, ctx, option=_option(param))


class CoreMLTarget(click.ParamType):
    """A Core ML deployment target that can hold an ML Program, in any letter case (`ios16`)."""

    name = "TARGET"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        """The checked value, or click's usage error carrying our message and hint."""
        by_lower = {target.lower(): target for target in validation.COREML_TARGETS}
        name = by_lower.get(str(value).strip().lower(), str(value))
        return _checked(validation.check_coreml_target, name, param, ctx)


class LabelsFile(click.Path):
    """An existing UTF-8 labels file with distinct labels; the count is checked after loading."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Path:
        """The checked value, or click's usage error carrying our message and hint."""
        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        _checked(validation.read_labels_file, path, param, ctx)
        return path


def _option(param: click.Parameter | None) -> str:
    return param.opts[-1] if param is not None and param.opts else "value"


def _checked(check: Callable[..., Any], value: Any, param: click.Parameter | None,
             ctx: click.Context | None, **options: Any) -> Any:
    """Run a validation.py check; its UsageError becomes click's usage error (exit 2)."""
    try:
        check(value, **options)
    except MobileOneError as error:
        bad = click.BadParameter(error.message, ctx=ctx, param=param)
        bad.hint = error.hint  # type: ignore[attr-defined]  # read by _click_hint
        raise bad from None
    return value


POSITIVE = FinitePositive()
INPUT_SIZE = InputSize()
EXISTING_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


class MobileOneGroup(click.Group):
    """The one error boundary: every failure becomes `error:` / `hint:` and an exit code.

    Click's own usage errors (missing argument, bad choice, no such option) are
    rendered like the core's `MobileOneError`s, without click's `Usage:` and
    `Try ...` lines; with `--json` anywhere on the command line, a failure also
    prints one `{"error": {...}}` object on stdout.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Run as click does, rendering click's own errors as ours."""
        arguments = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(arguments, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except click.ClickException as error:
            code = _report_click_error(error, json_mode=wants_json(arguments))
        except click.Abort:  # Ctrl-C while click parsed the command line
            report_failure("interrupted; nothing was written", None, code=EXIT_INTERRUPTED,
                           json_mode=wants_json(arguments))
            code = EXIT_INTERRUPTED
        code = code if isinstance(code, int) else EXIT_OK
        if not standalone_mode:
            return code
        sys.exit(code)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does, keeping the raw arguments for the bundle manifest."""
        # The command line as given, for the bundle manifest (sys.argv is not it when embedded).
        ctx.meta[ARGUMENTS_KEY] = tuple(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a `MobileOneError` becomes `error:`/`hint:` lines and its exit code."""
        json_mode = wants_json(ctx.meta.get(ARGUMENTS_KEY, ()))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):
            raise  # click's own exits and usage errors: not failures of ours
        except (KeyboardInterrupt, Exception) as error:
            # A library that catches the interrupt (a bare `except:` around an import) fails
            # later in its own way (numpy: "CPU dispatcher tracer already initialized";
            # torch: "module 'torch._dynamo' has no attribute 'exc'", which a converter then
            # reports as its failure): once a signal arrived, whatever unwinds is that interrupt.
            if isinstance(error, KeyboardInterrupt) or _INTERRUPTS.signalled:
                report_failure("interrupted; nothing was written", None, code=EXIT_INTERRUPTED,
                               json_mode=json_mode)
                ctx.exit(EXIT_INTERRUPTED)
            if not isinstance(error, MobileOneError):
                raise
            if ctx.meta.get(DEBUG_KEY):
                traceback.print_exc()
            report_failure(error.message, error.hint, code=error.exit_code, json_mode=json_mode)
            ctx.exit(error.exit_code)


def wants_json(arguments: Sequence[str]) -> bool:
    """Whether `--json` is on the command line (before a `--` that ends the options)."""
    options = list(arguments)
    if "--" in options:
        options = options[:options.index("--")]
    return "--json" in options


def report_failure(message: str, hint: str | None, *, code: int, json_mode: bool) -> None:
    """`error:` / `hint:` on stderr and, in --json mode, the error object on stdout."""
    terminal = console.Terminal(json_mode=json_mode)
    terminal.error(message, hint)
    if json_mode:
        terminal.emit_json({"error": error_payload(code, message, hint)})


def error_payload(code: int, message: str, hint: str | None) -> dict[str, Any]:
    """The `error` object of --json output: the exit code, the message and the hint."""
    return {"code": code, "message": printable(message),
            "hint": None if hint is None else printable(hint)}


def _report_click_error(error: click.ClickException, *, json_mode: bool) -> int:
    """Render click's own errors as ours; returns the exit code (2 for usage errors)."""
    if isinstance(error, NO_ARGUMENTS_IS_HELP):
        error.show()  # `mobileone` alone: the help text, as click prints it
        return error.exit_code
    possibilities = getattr(error, "possibilities", None)
    message = _sentence_case(error.message if possibilities else error.format_message())
    report_failure(message, _click_hint(error, possibilities), code=error.exit_code,
                   json_mode=json_mode)
    return error.exit_code


def _click_hint(error: click.ClickException, possibilities: list[str] | None) -> str | None:
    """Click's "did you mean", else where the usage is explained."""
    # A parse-time check that raised a MobileOneError hands its hint on as `hint`.
    carried = getattr(error, "hint", None)
    if isinstance(carried, str) and carried:
        return carried
    if possibilities:
        return "did you mean " + " or ".join(repr(p) for p in sorted(possibilities)) + "?"
    if isinstance(error, click.UsageError) and error.ctx is not None:
        return f"see `{error.ctx.command_path} --help`"
    return None


def _sentence_case(text: str) -> str:
    """Click's "Missing argument 'X'." as our messages read: "missing argument 'X'"."""
    text = text.strip().removesuffix(".")
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text


def run_and_render(ctx: click.Context, *, json_mode: bool, activity: str,
                   call: Callable[..., Any], render: Callable[[console.Terminal, Any], None]) -> None:
    """The one shape of every command: call the core, print JSON or tables, exit with its code.

    `call` receives a progress callback that updates the spinner's text. A
    result that fails (exit code 3) is rendered as tables or, with --json, as
    its JSON plus the same `error` object a raised error gives.
    """
    settings = ctx.find_root().meta
    if not settings.get(DEBUG_KEY):
        _silence_third_party()
    terminal = console.Terminal(json_mode=json_mode, quiet=bool(settings.get(QUIET_KEY)))
    # The core never prints, so whatever reaches stdout meanwhile is a library's chatter.
    with terminal.progress(activity) as update, quiet.captured(
            stdout=not settings.get(DEBUG_KEY), stderr=False):
        result = call(update)
    _INTERRUPTS.work_done = True
    render(terminal, result)  # in --json mode the tables go nowhere; errors are recorded
    if json_mode:
        payload = result.to_dict()
        if result.exit_code != EXIT_OK:
            message, hint = terminal.failure or ("the run failed", None)
            payload["error"] = error_payload(result.exit_code, message, hint)
        terminal.emit_json(payload)
    ctx.exit(result.exit_code)


def _remember(ctx: click.Context, parameter: click.Parameter, value: bool) -> bool:
    """Global flags given before or after the command land in the root context's meta."""
    if value and parameter.name:
        ctx.find_root().meta[f"mobileone.{parameter.name}"] = True
    return value


DEBUG_HELP = "Show tracebacks and third-party warnings."
QUIET_HELP = "Print only errors (and --json output): no tables, no progress."


def global_options(function: Any) -> Any:
    """`--debug` and `-q/--quiet` after the command too (`mobileone fold CKPT -o X -q`)."""
    for option in (
        click.option("--debug", is_flag=True, hidden=True, expose_value=False,
                     callback=_remember, help=DEBUG_HELP),
        click.option("-q", "--quiet", is_flag=True, hidden=True, expose_value=False,
                     callback=_remember, help=QUIET_HELP),
    ):
        function = option(function)
    return function


def cost_gate_options(function: Any) -> Any:
    """`--min-cosine` and `--min-agreement`, the gates on a reduced-precision artifact's cost."""
    for option in reversed((
        click.option("--min-cosine", type=click.FloatRange(min=-1, max=1), default=None,
                     help="Gate for reduced-precision and compressed artifacts: lowest mean "
                          "per-sample cosine against the fp32 train-time model "
                          f"[default: {DEFAULT_MIN_COSINE:g} for fp16/bf16, "
                          f"{QUANTIZED_MIN_COSINE:g} for --quantize]."),
        click.option("--min-agreement", type=click.FloatRange(min=0, max=1), default=None,
                     help="Gate for reduced-precision and compressed classifiers: lowest top-1 "
                          f"agreement with the fp32 train-time model [default: "
                          f"{DEFAULT_MIN_AGREEMENT:g} for fp16/bf16, "
                          f"{QUANTIZED_MIN_AGREEMENT:g} for --quantize]."),
    )):
        function = option(function)
    return function


def json_option(function: Any) -> Any:
    """`--json`, and the global flags, which every command takes after its name too."""
    function = click.option("--json", "json_mode", is_flag=True,
                            help="Print exactly one JSON object on stdout and nothing else "
                                 "there, a failure included.")(function)
    return global_options(function)


def fold_options(function: Any) -> Any:
    """The verification options every command that folds shares."""
    for option in reversed((
        click.option("--rtol", type=POSITIVE, default=None,
                     help="Largest max|candidate - reference| / max|reference| that passes "
                          f"[default: {AUTO_TOLERANCE}]."),
        click.option("--inputs", "inputs_dir", type=EXISTING_FOLDER,
                     help=f"Verify on your own images (a folder of {_IMAGE_KINDS}) instead of "
                          "seeded noise."),
        click.option("--input-size", type=INPUT_SIZE, default=DEFAULT_INPUT_SIZE,
                     show_default=True, help="Side of the square inputs (and of static exports)."),
        click.option("--ema", is_flag=True, help="Use the EMA copy of the weights."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"],
                                                  case_sensitive=False),
                     default="float32", show_default=True,
                     help="dtype of the safetensors weights (the fold is always float64)."),
    )):
        function = option(function)
    return function


def _silence_third_party() -> None:
    """Hide the chatter of torch, coremltools and onnx (version warnings, progress bars)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("coremltools", "torch", "onnx", "onnxruntime", "onnxsim"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=MobileOneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mobileone")
@click.option("--debug", is_flag=True, expose_value=False, callback=_remember, help=DEBUG_HELP)
@click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_remember,
              help=QUIET_HELP)
def main() -> None:
    """Fold train-time checkpoints (MobileOne, RepViT) into verified, deployable models.

    Reads Apple ml-mobileone, timm, OpenMMLab mmpretrain and shoutOutYangJie
    MobileOne checkpoints, and timm and THU-MIG RepViT ones. Exit codes: 0
    success, 1 bad input, 2 usage, 3 verification failed, 4 export failed, 130
    interrupted. --debug and -q/--quiet go before or after the command.
    """
    # SIGTERM (a cancelled CI job) unwinds like Ctrl-C, so staged outputs are removed.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


class _Interrupts:
    """The signals received, and whether the work is done (then a signal only waits).

    `invoke` reads `signalled` to know a later failure is the interrupt's doing; once
    the core has returned its result (files already in place), a signal no longer
    unwinds, so the output and the exit code stay true to what was written.
    """

    def __init__(self) -> None:
        self.signalled: list[int] = []
        self.work_done = False


_INTERRUPTS = _Interrupts()


def _interrupt(signum: int, frame: object) -> None:
    """Record the signal, then unwind as Ctrl-C does unless the work is already done."""
    _INTERRUPTS.signalled.append(signum)
    if _INTERRUPTS.work_done:
        return
    raise KeyboardInterrupt


@main.command("inspect", epilog=examples("inspect"))
@click.argument("checkpoint", type=EXISTING_FILE)
@click.option("--ema", is_flag=True, help="Read the EMA copy of the weights.")
@json_option
@click.pass_context
def inspect_command(ctx: click.Context, checkpoint: Path, ema: bool, json_mode: bool) -> None:
    """Show layout, variant, architecture and parameters of CHECKPOINT."""
    run_and_render(ctx, json_mode=json_mode, activity="reading checkpoint",
                   call=lambda update: api.inspect(checkpoint, ema=ema),
                   render=lambda terminal, result: terminal.model_summary(result))


@main.command("fold", epilog=examples("fold"))
@click.argument("checkpoint", type=EXISTING_FILE)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the folded .safetensors file.")
@fold_options
@click.option("--layout", type=click.Choice(ALL_LAYOUTS, case_sensitive=False),
              help="Key naming of the output (default: the checkpoint's own).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (never a folder, "
              "never an input).")
@click.option("--keep-distillation-head", is_flag=True,
              help="RepViT: keep both classifiers (averaged at run time) instead of folding "
                   "them into one Linear.")
@cost_gate_options
@json_option
@click.pass_context
def fold_command(ctx: click.Context, checkpoint: Path, output: Path, rtol: float | None,
                 inputs_dir: Path | None, input_size: int, layout: str | None, ema: bool,
                 dtype: str, force: bool, keep_distillation_head: bool, min_cosine: float,
                 min_agreement: float, json_mode: bool) -> None:
    """Fold CHECKPOINT, prove it equivalent, and write safetensors."""
    options = FoldOptions(checkpoint=checkpoint, output=output, rtol=rtol, inputs_dir=inputs_dir,
                          input_size=input_size, layout=layout, ema=ema, force=force,
                          dtype=dtype.lower(), keep_distillation_head=keep_distillation_head,
                          gates=Gates(min_cosine=min_cosine, min_agreement=min_agreement))
    run_and_render(ctx, json_mode=json_mode, activity="folding and verifying",
                   call=lambda update: api.fold(options, progress=update),
                   render=lambda terminal, result: terminal.export_result(result))


@main.command("export", epilog=examples("export"))
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--to", "target", required=True,
              type=click.Choice([*TARGETS, "all"], case_sensitive=False),
              help="Target to write; `all` writes every installed target side by side.")
@click.option("--require", "required", default="", metavar="TARGET,...",
              help="With --to all: fail (instead of skipping) when one of these targets' "
                   "packages is missing.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="File (one format) or folder (--to all); default derived from the variant.")
@click.option("--force", is_flag=True,
              help="Replace an existing output of the same kind: a file, a .mlpackage, or a "
                   "bundle holding only what mobileone wrote there (its manifest's files, "
                   "manifest.json, summary.md). A folder that is not a bundle, a bundle with "
                   "other files in it, and any input are never replaced.")
@fold_options
@click.option("--layout", type=click.Choice(ALL_LAYOUTS, case_sensitive=False),
              help="Key naming of the safetensors file (default: the checkpoint's own).")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True,
              help="ONNX opset.")
@click.option("--dynamic-batch", is_flag=True, help="ONNX: symbolic batch axis.")
@click.option("--dynamic-size", is_flag=True, help="ONNX: symbolic height and width.")
@click.option("--no-simplify", is_flag=True, help="ONNX: skip onnxsim.")
@click.option("--target", "coreml_target", type=CoreMLTarget(), default=None,
              help=f"Core ML minimum deployment target: {DEPLOYMENT_TARGET_RANGE} [default: "
                   "iOS16, or the oldest that runs the --quantize mode].")
@click.option("--quantize", type=click.Choice(QUANTIZE_MODES, case_sensitive=False),
              help="Compress: w8 (int8 weights; Core ML, ONNX), w8a8 (and int8 activations; "
                   "Core ML, ONNX, ExecuTorch, tflite), pal8/pal6/pal4 (Core ML palettes), fp16 "
                   "(ONNX, tflite). Each artifact is proven and its cost measured and gated.")
@click.option("--calibration", "calibration_dir", type=EXISTING_FOLDER,
              help="Images (a folder or an ImageFolder tree) to calibrate activations on; "
                   "without --inputs every 5th is held out to measure the cost.")
@click.option("--calibration-count", type=click.IntRange(min=1),
              help="Calibrate on this many of the images, picked evenly [default: all].")
@click.option("--calibration-method", type=click.Choice(CALIBRATION_METHODS, case_sensitive=False),
              default=DEFAULT_CALIBRATION_METHOD, show_default=True,
              help="ONNX w8a8: how activation ranges are chosen.")
@click.option("--keep-float", "keep_float", default="", metavar="N|LAYER,...",
              help="Keep layers float: the N most sensitive (ranked on the calibration "
                   "images, as `report --sensitivity` shows) or these folded layer names.")
@click.option("--precision", type=click.Choice(["fp16", "fp32"], case_sensitive=False),
              default="fp16",
              show_default=True, help="Core ML compute precision.")
@click.option("--channels-last", is_flag=True,
              help="LiteRT (tflite): an NHWC input (1 x H x W x 3), as Android camera pipelines "
                   "hand images.")
@click.option("--image-input", is_flag=True,
              help="Core ML: an image input (camera frames), normalisation folded into the model.")
@click.option("--labels", "labels_file", type=LabelsFile(),
              help="Core ML: make a classifier with these labels (one a line).")
@click.option("--description", help="Core ML: short description.")
@click.option("--model-version", help="Core ML: model version string.")
@click.option("--author", help="Core ML: author.")
@click.option("--license", "license_text", help="Core ML: license.")
@click.option("--max-params", type=NUMBER, help="Gate: fail (exit 3) above this many folded "
              "parameters; takes 5e6 or 5M.")
@click.option("--max-macs", type=NUMBER, help="Gate: fail above this many folded MACs at the "
              "export size; takes 3e8 or 300M.")
@click.option("--max-size-mb", type=POSITIVE,
              help="Gate: fail when any artifact is larger (MB of 10^6 bytes).")
@click.option("--keep-distillation-head", is_flag=True,
              help="RepViT: keep both classifiers (averaged at run time) instead of folding "
                   "them into one Linear.")
@cost_gate_options
@json_option
@click.pass_context
def export_command(ctx: click.Context, source: Path, target: str, output: Path | None,
                   force: bool, rtol: float | None, inputs_dir: Path | None, input_size: int,
                   ema: bool, dtype: str, layout: str | None, opset: int, dynamic_batch: bool,
                   dynamic_size: bool, no_simplify: bool, coreml_target: str | None, precision: str,
                   image_input: bool, labels_file: Path | None, description: str | None,
                   model_version: str | None, author: str | None, license_text: str | None,
                   max_params: float | None, max_macs: float | None, max_size_mb: float | None,
                   min_cosine: float, min_agreement: float, required: str,
                   channels_last: bool, keep_distillation_head: bool, quantize: str | None,
                   calibration_dir: Path | None, calibration_count: int | None,
                   calibration_method: str, keep_float: str, json_mode: bool) -> None:
    """Export SOURCE to ONNX and/or Core ML, each verified against the train-time model.

    SOURCE is a train-time checkpoint (folded and verified on the way) or a
    safetensors file written by `mobileone fold`.
    """
    target = target.lower()
    mode = quantize.lower() if quantize else None
    options = ExportOptions(
        source=source, targets=TARGETS if target == "all" else (target,), output=output,
        force=force, rtol=rtol, inputs_dir=inputs_dir, input_size=input_size, ema=ema,
        labels_file=labels_file,
        gates=Gates(max_params=max_params, max_macs=max_macs, max_size_mb=max_size_mb,
                    min_cosine=min_cosine, min_agreement=min_agreement),
        command=ctx.meta.get(ARGUMENTS_KEY, ()),
        required=tuple(name.strip().lower() for name in required.split(",") if name.strip()),
        keep_distillation_head=keep_distillation_head,
        safetensors=SafetensorsOptions(layout=layout, dtype=dtype),
        tflite=LiteRTOptions(channels_last=channels_last),
        onnx=OnnxOptions(opset=opset, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size,
                         simplify=not no_simplify),
        coreml=CoreMLOptions(target=coreml_target, precision=precision, image_input=image_input,
                             description=description, version=model_version, author=author,
                             license=license_text),
        quantize=QuantizeOptions(mode=mode, calibration_dir=calibration_dir,
                                 calibration_count=calibration_count,
                                 calibration_method=calibration_method.lower(),
                                 **parse_keep_float(keep_float)),
    )
    run_and_render(ctx, json_mode=json_mode, activity="exporting",
                   call=lambda update: api.export(options, progress=update),
                   render=lambda terminal, result: terminal.export_result(result))


def parse_keep_float(text: str) -> dict[str, Any]:
    """`--keep-float 3` (a count) or `--keep-float stage1.3.reparam_conv,linear` (names)."""
    text = text.strip()
    if text.isdigit():
        return {"keep_float_count": int(text)}
    return {"keep_float": tuple(name.strip() for name in text.split(",") if name.strip())}


@main.command("verify", epilog=examples("verify"))
@click.argument("artifact", type=click.Path(exists=True, path_type=Path), required=False)
@click.option("--manifest", type=EXISTING_FILE,
              help="Check a whole bundle: every hash, and every artifact when --against is given.")
@click.option("--against", type=EXISTING_FILE,
              help="The train-time checkpoint the artifact(s) must reproduce.")
@click.option("--inputs", "inputs_dir", type=EXISTING_FOLDER,
              help=f"Verify on your own images (a folder of {_IMAGE_KINDS}) instead of seeded "
                   "noise.")
@click.option("--input-size", type=INPUT_SIZE,
              help="Side of the square inputs [default: the artifact's static size, else 224].")
@click.option("--rtol", type=POSITIVE, default=None,
              help=f"Tolerance of the conversion proof [default: {AUTO_TOLERANCE}].")
@click.option("--ema", is_flag=True, help="Use the EMA copy of the checkpoint's weights.")
@cost_gate_options
@json_option
@click.pass_context
def verify_command(ctx: click.Context, artifact: Path | None, manifest: Path | None,
                   against: Path | None, inputs_dir: Path | None, input_size: int | None,
                   rtol: float | None, ema: bool, min_cosine: float, min_agreement: float,
                   json_mode: bool) -> None:
    """Check ARTIFACT (safetensors, ONNX, Core ML) or a bundle's --manifest.

    `verify ARTIFACT --against CKPT` re-runs the numerical verification;
    `verify --manifest dist/manifest.json [--against CKPT]` recomputes every
    hash and, with a checkpoint, re-verifies every artifact. Exits 0 when all
    hold, 3 when not.
    """
    if (artifact is None) == (manifest is None):
        raise click.UsageError("give either ARTIFACT or --manifest")
    if manifest is not None:
        run_and_render(ctx, json_mode=json_mode, activity="checking the bundle",
                       call=lambda update: api.verify_bundle(
                           manifest, against=against, rtol=rtol, progress=update,
                           gates=Gates(min_cosine=min_cosine, min_agreement=min_agreement)),
                       render=lambda terminal, result: terminal.manifest_check(result))
        return
    if artifact is None or against is None:
        raise click.UsageError("ARTIFACT needs --against CHECKPOINT")
    options = VerifyOptions(artifact=artifact, against=against, inputs_dir=inputs_dir,
                            input_size=input_size, rtol=rtol, ema=ema,
                            gates=Gates(min_cosine=min_cosine, min_agreement=min_agreement))
    run_and_render(ctx, json_mode=json_mode, activity="verifying",
                   call=lambda update: api.verify(options, progress=update),
                   render=lambda terminal, result: terminal.artifact_check(result))


@main.command("demo", epilog=examples("demo"))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("mobileone-demo"), show_default=True,
              help="Folder for the generated checkpoint and the folded model.")
@click.option("--family", type=click.Choice(["mobileone", "repvit"], case_sensitive=False),
              default="mobileone", show_default=True,
              help="What to build: a MobileOne S0 (Apple layout) or a RepViT m0_9 (timm's).")
@json_option
@click.pass_context
def demo_command(ctx: click.Context, output_dir: Path, family: str, json_mode: bool) -> None:
    """Build a seeded checkpoint (S0, or a RepViT m0_9), fold and verify it: no files needed."""
    family = family.lower()
    what = "RepViT m0_9" if family == "repvit" else "S0"

    def render(terminal: console.Terminal, result: Any) -> None:
        terminal.info(f"generated a train-time {what} checkpoint at {result.summary.source}")
        terminal.export_result(result)
        if result.exit_code == EXIT_OK:
            terminal.next_steps(demo_next_commands(
                result.summary.source, result.artifacts[0].path, output_dir))

    run_and_render(ctx, json_mode=json_mode,
                   activity=f"building a seeded {what} checkpoint, folding and verifying",
                   call=lambda update: api.demo(output_dir, family=family, progress=update),
                   render=render)


def demo_next_commands(checkpoint: Path, folded: Path, output_dir: Path) -> tuple[str, ...]:
    """What to run on the demo's files next: a release bundle, its check, the speed-up."""
    def quoted(path: Path) -> str:
        return shlex.quote(str(path))

    bundle = output_dir / "dist"
    return (
        f"mobileone export {quoted(checkpoint)} --to all -o {quoted(bundle)}",
        (f"mobileone verify --manifest {quoted(bundle / 'manifest.json')} "
         f"--against {quoted(checkpoint)}"),
        f"mobileone report {quoted(checkpoint)} {quoted(folded)}",
    )


@main.command("report", epilog=examples("report"))
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
@click.option("--sensitivity", is_flag=True, default=False,
              help="Instead: rank the folded layers of one SOURCE by the output error of "
                   "giving only that layer int8 weights, on --calibration images (what "
                   "`export --keep-float N` keeps float).")
@click.option("--calibration", "calibration_dir", type=EXISTING_FOLDER,
              help="With --sensitivity: the images to measure on (a folder or ImageFolder tree).")
@click.option("--calibration-count", type=click.IntRange(min=1),
              help="With --sensitivity: use this many of the images, picked evenly.")
@click.option("--quantize", type=click.Choice(SENSITIVITY_MODES, case_sensitive=False),
              default="w8", show_default=True,
              help="With --sensitivity: the mode whose int8 weights are tried layer by layer.")
@json_option
@click.pass_context
def report_command(ctx: click.Context, sources: tuple[Path, ...], latency: bool, batch: int,
                   size: tuple[int, int], threads: int | None, runs: int, warmup: int,
                   per_stage: bool, sensitivity: bool, calibration_dir: Path | None,
                   calibration_count: int | None, quantize: str, json_mode: bool) -> None:
    """Measure params, MACs and latency of SOURCES, train-time vs folded.

    Each SOURCE is a train-time checkpoint, a folded .safetensors file or an
    .onnx export. MACs count the conv and linear layers (the paper's FLOPs).
    With --sensitivity: rank the layers of one checkpoint by what int8 weights cost.
    """
    if sensitivity:
        if len(sources) != 1 or calibration_dir is None or size[0] != size[1]:
            raise click.UsageError("--sensitivity takes one SOURCE, --calibration DIR and a "
                                   "square --size")
        ranking = SensitivityOptions(source=sources[0], calibration_dir=calibration_dir,
                                     calibration_count=calibration_count, mode=quantize.lower(),
                                     input_size=size[0])
        run_and_render(ctx, json_mode=json_mode, activity="ranking the layers",
                       call=lambda update: api.sensitivity(ranking),
                       render=lambda terminal, result: terminal.sensitivity(result))
        return
    if calibration_dir is not None or calibration_count is not None:
        raise click.UsageError("--calibration applies to --sensitivity")
    options = ReportOptions(sources=sources, latency=latency, batch=batch, size=size,
                            threads=threads, runs=runs, warmup=warmup, per_stage=per_stage)
    run_and_render(ctx, json_mode=json_mode, activity="measuring params, MACs and latency",
                   call=lambda update: api.report(options),
                   render=lambda terminal, result: terminal.report(result))


COLLECTOR_THRESHOLD = 10_000
"""Allocations between young-generation collections of a command's process (CPython: 700)."""


def tune_collector() -> None:
    """Cheaper garbage collection for the rest of a command, once torch and the pipeline are in.

    The process runs one command and exits, so the objects its imports made live
    until then: `gc.freeze()` keeps every collection from traversing them again,
    and a larger young generation makes full collections rarer while the
    converters import and allocate. Measured on S4: `export --to all` spent 4.2 s
    in collections (15 full ones, 3.5 s), 1.6 s after this; `fold` had one full
    collection of 90 ms, none after. Only the console script does this: a Python
    program that imports the API keeps its own collector settings.
    """
    gc.freeze()
    gc.set_threshold(COLLECTOR_THRESHOLD, *gc.get_threshold()[1:])


def entry_point() -> None:
    """The console script: `main`, with an interrupted run ending in exit code 130 for sure.

    Cleanup (staged outputs) has already run when the interrupt reaches `invoke`.
    But a KeyboardInterrupt that passed through Python code run by a C extension
    (torch's pybind11 initialisation) sets CPython's "unhandled interrupt" flag
    even though it was handled, and CPython then kills itself with SIGINT at
    exit (measured: exit -2 instead of 130 when interrupted during imports).
    So an interrupted run leaves without the interpreter's exit path.
    """
    _api_module.when_imported(tune_collector)  # the process is the command's alone
    try:
        main()
    except SystemExit as exit_request:
        if exit_request.code == EXIT_INTERRUPTED:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        raise


if __name__ == "__main__":  # pragma: no cover
    entry_point()

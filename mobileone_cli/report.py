"""Parameters, MACs and latency of train-time, folded and exported MobileOnes, measured.

The paper's point is that FLOPs and parameter counts do not predict latency, so
the report measures all three side by side instead of deriving one from another.

MACs come from PyTorch's own counter (`torch.utils.flop_counter.FlopCounterMode`),
not a hand-written formula. It counts 2 FLOPs per multiply-accumulate of every
convolution and matrix product and nothing else (no conv bias, BatchNorm, ReLU,
sigmoid, pooling, squeeze-excite gate or branch sum); this module halves it.
Counting needs shapes only, so the report counts on weightless meta-device models.

Against the paper's table (folded, 224 x 224) this gives 2.1 / 4.8 / 7.8 / 10.1 /
14.8 M parameters exactly and 275 / 825 / 1298 / 1896 / 2979 M MACs for the
paper's 275 / 825 / 1299 / 1896 / 2978 M. S4 is 2978 (2977.6) without its
squeeze-excite convs, which we count because they are convs (1.6 M); no conv +
linear count gives S2's 1299 (1298.4). So the paper's counter differed in such
sub-million details, and its FLOPs column is multiply-accumulates of conv and
linear layers to within one digit.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.checkpoint import LoadedCheckpoint, load_checkpoint, recognise
from mobileone_cli.errors import EXIT_OK, BadCheckpointError, UsageError
from mobileone_cli.files import sha256_path
from mobileone_cli.fold import fold_state
from mobileone_cli.model import build_model, build_shapes_only
from mobileone_cli.options import DEFAULT_REPORT_SIZE, ReportOptions
from mobileone_cli.reader import RawCheckpoint
from mobileone_cli.repvit import ModelSpec
from mobileone_cli.results import MAC_CONVENTION
from mobileone_cli.versions import stack_versions

if TYPE_CHECKING:
    import torch

RUNTIME_TORCH = "torch-eager"
RUNTIME_ONNX = "onnxruntime"
MIN_SIDE = 32
"""The network downsamples by 32: a smaller side leaves stage 4 with no pixels."""
INPUT_SEED = 0
ONNX_SUFFIX = ".onnx"


@dataclass(frozen=True)
class Complexity:
    """Size and arithmetic of one model at one input size (batch 1)."""

    params: int
    """Learnable parameters; BatchNorm running statistics are buffers and do not count."""
    macs: int
    """Multiply-accumulates of conv and linear layers: the paper's "FLOPs" column."""

    def to_dict(self) -> dict[str, int]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"params": self.params, "macs": self.macs}


@dataclass(frozen=True)
class StageComplexity:
    """One part of a MobileOne: the stem, a stage, or the classifier head."""

    name: str
    params: int
    macs: int
    output_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {"name": self.name, "params": self.params, "macs": self.macs,
                "output_shape": list(self.output_shape)}


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one model on one runtime, after warm-up runs."""

    runtime: str
    """"torch-eager" or "onnxruntime"."""
    model: str
    """"train" (train-time branches), "fused" (folded) or "onnx"."""
    batch: int
    size: tuple[int, int]
    threads: int
    runs: int
    median_ms: float
    p90_ms: float
    images_per_second: float
    """batch / median time."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {
            "runtime": self.runtime,
            "model": self.model,
            "batch": self.batch,
            "size": list(self.size),
            "threads": self.threads,
            "runs": self.runs,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "images_per_second": self.images_per_second,
        }


# -- complexity -------------------------------------------------------------------------


def count_parameters(model: torch.nn.Module) -> int:
    """Learnable parameters of `model` (buffers such as BatchNorm statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def measure_complexity(model: torch.nn.Module, *, size: tuple[int, int] = DEFAULT_REPORT_SIZE
                       ) -> Complexity:
    """Parameters and MACs of `model` on one 3 x H x W image.

    MACs are PyTorch's FlopCounterMode figure halved: it counts 2 FLOPs per
    multiply-accumulate of every convolution and matrix product and nothing
    else. Squeeze-excite's 1x1 convs on the pooled vector are convs, so they
    count (1.6 M MACs in S4, none in S0-S3); the classifier's linear layer counts.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(_example(model, size))
    return Complexity(params=count_parameters(model), macs=_macs(counter.get_total_flops()))


def _parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The stem, each stage and the head (if any) of a MobileOne or a RepViT."""
    children = dict(model.named_children())
    if "stage0" in children:  # MobileOne: stage0 (the stem), stage1..stageN, linear
        parts = [("stem", children["stage0"])]
        parts += [(f"stage {index}", children[f"stage{index}"])
                  for index in range(1, len(children)) if f"stage{index}" in children]
        head = children.get("linear")
    else:  # RepViT: stem, stages, head
        parts = [("stem", children["stem"])]
        parts += [(f"stage {index}", stage)
                  for index, stage in enumerate(children["stages"].children(), start=1)]
        head = children.get("head")
    return parts + ([("head", head)] if head is not None else [])


def per_stage(model: torch.nn.Module, *, size: tuple[int, int]) -> tuple[StageComplexity, ...]:
    """Parameters, MACs and output shape of the stem, stages 1-4 and the head (if any).

    Each part is measured in one forward pass of the whole model, by reading
    the counter before and after the part runs, so the parts add up to
    `measure_complexity` unless something outside them computes.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parts = _parts(model)
    counter = FlopCounterMode(display=False)
    started: dict[str, int] = {}
    measured: dict[str, tuple[int, tuple[int, ...]]] = {}

    def before(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: object) -> None:
            started[name] = counter.get_total_flops()
        return hook

    def after(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            measured[name] = (counter.get_total_flops() - started[name], tuple(output.shape))
        return hook

    # Hooks, not a re-implementation of `forward`: the model runs exactly as it always does.
    handles = [module.register_forward_pre_hook(before(name)) for name, module in parts]
    handles += [module.register_forward_hook(after(name)) for name, module in parts]
    try:
        with counter, torch.inference_mode():
            model(_example(model, size))
    finally:
        for handle in handles:
            handle.remove()
    return tuple(
        StageComplexity(name=name, params=count_parameters(module),
                        macs=_macs(measured[name][0]), output_shape=measured[name][1])
        for name, module in parts
    )


def _macs(flops: int) -> int:
    # Every counted FLOP comes from a multiply-accumulate, so the count is always even.
    return int(flops) // 2


def _example(model: torch.nn.Module, size: tuple[int, int]) -> torch.Tensor:
    import torch

    parameter = next(model.parameters())
    return torch.zeros(1, 3, *size, dtype=parameter.dtype, device=parameter.device)


# -- latency ----------------------------------------------------------------------------


def measure_latency(
    run: Callable[[], object],
    *,
    runtime: str,
    model: str,
    batch: int,
    size: tuple[int, int],
    threads: int,
    runs: int,
    warmup: int,
) -> Latency:
    """Time `run`: `warmup` untimed calls, then `runs` calls timed with perf_counter.

    `run` must do the whole inference (its input prepared beforehand, as the
    runners below do), so the figure is the model's time and nothing else.
    Several models are timed together, in rounds, by `time_interleaved`.
    """
    [seconds] = time_interleaved([run], runs=runs, warmup=warmup)
    return latency_of(seconds, runtime=runtime, model=model, batch=batch, size=size,
                      threads=threads)


def time_interleaved(runners: Sequence[Callable[[], object]], *, runs: int, warmup: int
                     ) -> list[list[float]]:
    """Seconds of each runner's `runs` timed calls, taken in interleaved rounds.

    Each round calls every runner once, starting one further along each time,
    so a busy moment of the machine lands on all models alike instead of
    skewing whichever model was being timed in its own block of runs, and no
    model always runs first (caches, frequency steps). `warmup` untimed rounds
    come first.
    """
    if runs < 1:
        raise UsageError(f"runs must be at least 1, got {runs}", hint="pass --runs 1 or more")
    for _ in range(warmup):
        for run in runners:
            run()
    seconds: list[list[float]] = [[] for _ in runners]
    for round_index in range(runs):
        for offset in range(len(runners)):
            index = (round_index + offset) % len(runners)
            start = time.perf_counter()
            runners[index]()
            seconds[index].append(time.perf_counter() - start)
    return seconds


def latency_of(seconds: Sequence[float], *, runtime: str, model: str, batch: int,
               size: tuple[int, int], threads: int) -> Latency:
    """Median, p90 and throughput of timed calls, each taking `batch` images."""
    median_ms = statistics.median(seconds) * 1000
    return Latency(
        runtime=runtime,
        model=model,
        batch=batch,
        size=size,
        threads=threads,
        runs=len(seconds),
        median_ms=median_ms,
        p90_ms=percentile(list(seconds), 0.9) * 1000,
        images_per_second=batch * 1000 / median_ms if median_ms > 0 else math.inf,
    )


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); one value is its own."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def torch_runner(model: torch.nn.Module, *, batch: int, size: tuple[int, int], threads: int
                 ) -> Callable[[], object]:
    """One eager forward pass of `model` on a fixed seeded batch, in inference mode.

    Sets torch's intra-op thread count (a process-wide setting) to `threads`
    now, so time it before creating a runner with another count.
    """
    import torch

    torch.set_num_threads(threads)
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(INPUT_SEED)
    inputs = torch.randn(batch, 3, *size, generator=generator).to(parameter.dtype)

    def run() -> object:
        with torch.inference_mode():
            return model(inputs)

    return run


def onnx_runner(path: Path, *, batch: int, size: tuple[int, int], threads: int
                ) -> Callable[[], object]:
    """One onnxruntime CPU inference of the file at `path` on a fixed seeded batch.

    The session uses `threads` intra-op threads and runs nodes sequentially.
    A static export only takes its own input shape; another raises UsageError.
    """
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    wanted = (batch, 3, *size)
    fixed = [dim if isinstance(dim, int) else None for dim in model_input.shape]
    if len(fixed) != 4 or any(dim is not None and dim != want
                              for dim, want in zip(fixed, wanted, strict=True)):
        shape = " x ".join(str(dim) if dim is not None else "?" for dim in fixed)
        raise UsageError(
            f"{path} takes input {shape}; batch {batch} at {size[0]} x {size[1]} does not fit",
            hint=_fitting_options(fixed),
        )
    inputs = np.random.default_rng(INPUT_SEED).standard_normal(wanted, dtype=np.float32)
    feed = {model_input.name: inputs}

    def run() -> object:
        return session.run(None, feed)

    return run


def _fitting_options(fixed: list[int | None]) -> str:
    if len(fixed) != 4:
        return "the file does not take an N x 3 x H x W image batch"
    batch, _, height, width = fixed
    parts = []
    if height is not None or width is not None:
        parts.append(f"--size {height or 'H'} {width or 'W'}")
    if batch is not None:
        parts.append(f"--batch {batch}")
    return f"pass {' '.join(parts)}, or export with a dynamic batch and size"


# -- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceReport:
    """One row of the report: one file, its models, their size, arithmetic and speed."""

    source: Path
    kind: str
    """"train-time" (a checkpoint with branches), "folded" (already folded) or "onnx"."""
    variant: str
    train: Complexity | None
    """None when the file holds no train-time model (folded or ONNX)."""
    fused: Complexity | None
    """None only for an ONNX file whose weights do not map back to a MobileOne."""
    latency: tuple[Latency, ...]
    file_bytes: int
    train_stages: tuple[StageComplexity, ...] | None = None
    fused_stages: tuple[StageComplexity, ...] | None = None

    @property
    def speedup(self) -> float | None:
        """Train-time torch-eager median / folded torch-eager median (None without both)."""
        medians = {item.model: item.median_ms for item in self.latency
                   if item.runtime == RUNTIME_TORCH}
        if "train" not in medians or "fused" not in medians or medians["fused"] <= 0:
            return None
        return medians["train"] / medians["fused"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        stages = None
        if self.train_stages is not None or self.fused_stages is not None:
            stages = {
                "train": _stage_list(self.train_stages),
                "fused": _stage_list(self.fused_stages),
            }
        return {
            "source": str(self.source),
            "kind": self.kind,
            "variant": self.variant,
            "train": self.train.to_dict() if self.train else None,
            "fused": self.fused.to_dict() if self.fused else None,
            "latency": [item.to_dict() for item in self.latency],
            "speedup": self.speedup,
            "file_bytes": self.file_bytes,
            "stages": stages,
        }


@dataclass(frozen=True)
class Report:
    """Params, MACs and latency of every source, measured with the same settings."""

    rows: tuple[SourceReport, ...]
    batch: int
    size: tuple[int, int]
    threads: int
    runs: int
    warmup: int
    latency_measured: bool
    cpus: int
    """CPUs this process may run on."""
    load_average: float | None = None
    """The system's 1-minute load average when measuring began (None where unknown)."""
    versions: dict[str, str] = field(default_factory=dict)
    """Versions of python and the runtimes present (torch, onnxruntime, numpy): they set speed."""
    cpu_model: str | None = None
    """The processor's name (/proc/cpuinfo's "model name", else the platform's), None if unknown."""

    @property
    def exit_code(self) -> int:
        """Always 0: a report measures, it does not judge."""
        return EXIT_OK

    @property
    def machine_was_busy(self) -> bool:
        """Other work competed for the CPUs, so the latency figures are not trustworthy."""
        return self.load_average is not None and self.load_average > self.cpus

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of this result, as `--json` prints it."""
        return {
            "mac_convention": MAC_CONVENTION,
            "batch": self.batch,
            "size": list(self.size),
            # A thread count describes timing; nothing was timed without latency.
            "threads": self.threads if self.latency_measured else None,
            "runs": self.runs,
            "warmup": self.warmup,
            "latency_measured": self.latency_measured,
            "cpus": self.cpus,
            "load_average": self.load_average,
            "cpu_model": self.cpu_model,
            "versions": dict(self.versions),
            "sources": [row.to_dict() for row in self.rows],
        }


TimingBackends = Callable[[str], Any]
"""A path's on-device backend (one with `open` and `timed_runner`), or None; the API passes
the export registry's, so this module, below the exporters, never imports them."""


def _no_on_device(path: str) -> None:
    """No on-device runtime: every source is a checkpoint or an ONNX file."""


def report_sources(options: ReportOptions, *,
                   on_device: TimingBackends = _no_on_device) -> Report:
    """Measure every source with the same batch, size and thread count.

    Every model of every source is built first, then all are timed together
    in interleaved rounds (see `time_interleaved`). Torch's process-wide
    thread count is restored afterwards. `on_device` finds the backend that
    times a `.pte`, `.tflite` or `.ort` source in its own runtime.
    """
    import torch

    _check_options(options)
    load_average = _load_average()
    previous_threads = torch.get_num_threads()
    threads = options.threads or previous_threads
    try:
        planned = [_report_source(path, options, threads=threads, on_device=on_device)
                   for path in options.sources]
        rows = _timed(planned, options, threads=threads)
    finally:
        torch.set_num_threads(previous_threads)
    return Report(rows=rows, batch=options.batch, size=options.size, threads=threads,
                  runs=options.runs, warmup=options.warmup, latency_measured=options.latency,
                  cpus=_cpus(), load_average=load_average, versions=runtime_versions(),
                  cpu_model=cpu_model())


@dataclass(frozen=True)
class TimedModel:
    """One model to time: the runtime that runs it, its name in the report, one inference."""

    runtime: str
    model: str
    run: Callable[[], object]


def _timed(planned: Sequence[tuple[SourceReport, tuple[TimedModel, ...]]],
           options: ReportOptions, *, threads: int) -> tuple[SourceReport, ...]:
    """The rows with their latency, every model of every row timed in the same rounds."""
    models = [model for _, timed in planned for model in timed]
    if not models:
        return tuple(row for row, _ in planned)
    seconds = iter(time_interleaved([model.run for model in models], runs=options.runs,
                                    warmup=options.warmup))
    rows = []
    for row, timed in planned:
        latency = tuple(
            latency_of(next(seconds), runtime=model.runtime, model=model.model,
                       batch=options.batch, size=options.size, threads=threads)
            for model in timed
        )
        rows.append(replace(row, latency=latency))
    return tuple(rows)


RUNTIME_PACKAGES = ("torch", "onnxruntime", "numpy", "executorch", "ai-edge-litert")


def runtime_versions() -> dict[str, str]:
    """Versions of python and of each runtime package present, by distribution metadata."""
    versions = stack_versions(RUNTIME_PACKAGES)
    del versions["mobileone"]
    return versions


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The processor's name: Linux's "model name" line, else what `platform` knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass  # not Linux: fall back on the platform module
    return platform.processor() or platform.machine() or None


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return None


def _check_options(options: ReportOptions) -> None:
    if not options.sources:
        raise UsageError("no source to report on", hint="pass one or more checkpoint or .onnx files")
    if min(options.size) < MIN_SIDE:
        raise UsageError(f"input size {options.size[0]} x {options.size[1]} is too small",
                         hint=f"MobileOne downsamples by 32; pass --size of {MIN_SIDE} or more")
    for name, value, least in (("batch", options.batch, 1), ("runs", options.runs, 1),
                               ("warmup", options.warmup, 0),
                               ("threads", 1 if options.threads is None else options.threads, 1)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}",
                             hint=f"pass --{name} {least} or more")


def _report_source(path: Path, options: ReportOptions, *, threads: int,
                   on_device: TimingBackends) -> tuple[SourceReport, tuple[TimedModel, ...]]:
    """One row without latency, and the models to time for it (none without --latency)."""
    if path.suffix.lower() == ONNX_SUFFIX:
        return _report_onnx(path, options, threads=threads)
    backend = on_device(str(path))
    if backend is not None:
        return _report_on_device(path, backend, options, threads=threads)
    return _report_checkpoint(load_checkpoint(path), options, threads=threads)


def _report_on_device(path: Path, backend: Any, options: ReportOptions, *, threads: int
                      ) -> tuple[SourceReport, tuple[TimedModel, ...]]:
    """An on-device artifact (.pte, .tflite, .ort): timed in its own runtime, as written.

    Its weights are in the runtime's own format, so params and MACs are not
    counted here (report the checkpoint beside it for those); its input is the
    fixed shape the file declares, which `--batch` and `--size` must match.
    """
    import numpy as np

    declared = backend.open(path).declared
    shape = tuple(declared.input_shape)
    height, width = (shape[1:3] if declared.layout == "NHWC" else shape[2:4])
    if (shape[0], height, width) != (options.batch, *options.size):
        raise UsageError(f"{path} takes input {' x '.join(map(str, shape))}; batch "
                         f"{options.batch} at {options.size[0]} x {options.size[1]} does not fit",
                         hint=f"pass --batch {shape[0]} --size {height} {width}")
    timed: list[TimedModel] = []
    if options.latency:
        runner = backend.timed_runner(path, threads=threads)
        inputs = np.random.default_rng(INPUT_SEED).standard_normal(shape, dtype=np.float32)
        runtime = declared.runtime.split(" ")[0]
        timed.append(TimedModel(runtime=runtime, model=backend.name, run=lambda: runner(inputs)))
    details = declared.details.get("metadata") or {}
    variant = details.get("mobileone.variant", "unknown") if isinstance(details, dict) else "unknown"
    row = SourceReport(source=path, kind=backend.name, variant=variant, train=None, fused=None,
                       latency=(), file_bytes=path.stat().st_size)
    return row, tuple(timed)


def _report_checkpoint(loaded: LoadedCheckpoint, options: ReportOptions, *, threads: int
                       ) -> tuple[SourceReport, tuple[TimedModel, ...]]:
    spec = loaded.spec
    train_spec = None if spec.is_folded else spec
    timed: list[TimedModel] = []
    if options.latency:
        # All models stay in memory until every one is timed: the price of interleaving.
        if train_spec is not None:
            timed.append(_torch_model(build_model(spec, loaded.state), "train", options,
                                      threads=threads))
            fused_model = build_model(spec.folded(), fold_state(spec, loaded.state))
        else:
            fused_model = build_model(spec, loaded.state)
        timed.append(_torch_model(fused_model, "fused", options, threads=threads))
    row = SourceReport(
        source=loaded.source,
        kind="train-time" if train_spec else "folded",
        variant=loaded.variant,
        train=_complexity(train_spec, options) if train_spec else None,
        fused=_complexity(spec.folded(), options),
        latency=(),
        file_bytes=loaded.source.stat().st_size,
        train_stages=_stages(train_spec, options) if train_spec else None,
        fused_stages=_stages(spec.folded(), options),
    )
    return row, tuple(timed)


def _report_onnx(path: Path, options: ReportOptions, *, threads: int
                 ) -> tuple[SourceReport, tuple[TimedModel, ...]]:
    """An ONNX file: onnxruntime latency; params from its initializers; MACs by mapping back.

    When the initializers carry a folded MobileOne's key names (Apple's, timm's
    or mmpretrain's), as `mobileone export` writes them, they are read back as
    a folded checkpoint: MACs are counted on that architecture (same counter,
    same convention) and the torch model with the file's own weights is timed
    in torch eager too. Otherwise MACs are unknown and `fused` is None.
    """
    initializers, metadata = _read_onnx(path)
    params = sum(int(value.numel()) for value in initializers.values())
    loaded = _map_back(path, initializers)
    timed: list[TimedModel] = []
    if options.latency:
        if loaded is not None:
            timed.append(_torch_model(build_model(loaded.spec, loaded.state), "fused", options,
                                      threads=threads))
        runner = onnx_runner(path, batch=options.batch, size=options.size, threads=threads)
        timed.append(TimedModel(runtime=RUNTIME_ONNX, model="onnx", run=runner))
    fused = None
    if loaded is not None:
        fused = Complexity(params=params, macs=_complexity(loaded.spec, options).macs)
    row = SourceReport(
        source=path,
        kind="onnx",
        variant=loaded.variant if loaded else metadata.get("mobileone.variant", "unknown"),
        train=None,
        fused=fused,
        latency=(),
        file_bytes=path.stat().st_size,
        fused_stages=_stages(loaded.spec, options) if loaded else None,
    )
    return row, tuple(timed)


def _complexity(spec: ModelSpec, options: ReportOptions) -> Complexity:
    return measure_complexity(build_shapes_only(spec), size=options.size)


def _stages(spec: ModelSpec, options: ReportOptions) -> tuple[StageComplexity, ...] | None:
    return per_stage(build_shapes_only(spec), size=options.size) if options.per_stage else None


def _read_onnx(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The floating-point initializers (the weights) and metadata of an ONNX file."""
    import onnx
    import torch
    from google.protobuf.message import Error as ProtobufError
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(path))
    except (ProtobufError, OSError, ValueError) as error:
        raise BadCheckpointError(f"{path} is not a readable ONNX file ({error})",
                                 hint="export it again, or check the path") from None
    initializers = {}
    for initializer in proto.graph.initializer:
        array = numpy_helper.to_array(initializer)
        # Integer initializers are shapes and axes, not weights.
        if array.dtype.kind == "f":
            initializers[initializer.name] = torch.from_numpy(array.copy())
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    return initializers, metadata


def _map_back(path: Path, initializers: dict[str, torch.Tensor]) -> LoadedCheckpoint | None:
    raw = RawCheckpoint(path=path, sha256=sha256_path(path), file_format="onnx",
                        state=initializers, container_key=None, stripped_prefixes=(),
                        skipped_extras=(), metadata={}, has_ema=False)
    try:
        loaded = recognise(raw)
    except BadCheckpointError:
        return None  # renamed or rewritten weights: report the file without MACs
    return loaded if loaded.is_folded else None


def _torch_model(model: torch.nn.Module, name: str, options: ReportOptions, *, threads: int
                 ) -> TimedModel:
    runner = torch_runner(model, batch=options.batch, size=options.size, threads=threads)
    return TimedModel(runtime=RUNTIME_TORCH, model=name, run=runner)


def _stage_list(stages: tuple[StageComplexity, ...] | None) -> list[dict[str, Any]] | None:
    return None if stages is None else [stage.to_dict() for stage in stages]

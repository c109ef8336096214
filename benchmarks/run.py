"""Time and peak memory of `mobileone fold` and `export` for S0-S4, the targets, and latency.

    .venv/bin/python benchmarks/run.py                      # S0-S4, every figure 3 times
    .venv/bin/python benchmarks/run.py --quick              # S0 and S4, once: a fast check
    .venv/bin/python benchmarks/run.py --variants s0,s4 --repeat 5 --out /tmp/results.md

Every command runs as a separate process, as a user runs it, through
`peak.py` (one wrapper per command, so each peak RSS is that command's alone).
The targets are ratios measured in the same run, so a slow or busy machine
moves both sides of each ratio:

- `fold` of S4 over the floor (`floor.py`: import torch, load, the verification
  forward passes, the fold arithmetic, the folded forward): at most 1.2, in the
  median and in each round's pair; its peak memory under 700 MiB.
- `export --to all` of S4 over the sum of its parts (`floor_all.py`: the floor,
  then each target converted by hand and run once in its runtime): at most 1.3,
  in the median and in each round's pair.
- onnxruntime latency of our ONNX export over the hand-made one (`handmade.py`):
  at most 1.00, for every variant.
- `mobileone --help` over a bare `python -c "import click, rich"`: at most 1.3,
  and no torch module imported.

Checkpoints are generated (`mobileone_cli.synthetic.make_checkpoint`, seed 0):
nothing is downloaded. Tables go to stdout and to `--out` (Markdown), progress
to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peak import busy_cpu_seconds, others_share

if TYPE_CHECKING:
    from mobileone_cli.report import Report

HERE = Path(__file__).resolve().parent
ALL_VARIANTS = ("s0", "s1", "s2", "s3", "s4")
QUICK_VARIANTS = ("s0", "s4")
TARGET_VARIANT = "s4"
INPUT_SIZE = 224
FOLD_TIME_LIMIT = 1.2
ALL_TIME_LIMIT = 1.3
FOLD_MEMORY_LIMIT_MIB = 700.0
ONNX_LATENCY_LIMIT = 1.00
HELP_TIME_LIMIT = 1.3
HELP_RUNS = 10
ONNX_PAIRS = 200
"""Interleaved (ours, hand-made) inference pairs per variant: enough for a stable median."""
ONNX_WARMUP = 10
ONNX_SESSIONS = 4
"""Fresh session pairs per race, the pairs split among them. One session's memory layout
moves its latency by up to 0.5% (measured: the hand-made S4 raced against a byte-identical
copy of itself gave 1.001-1.004), a bias interleaving cannot cancel; averaging sessions does."""
DEFAULT_RUNS = 20
DEFAULT_THREADS = 1
"""One thread: on a small machine shared with other jobs, two-thread timings are dominated
by the stalls of threads waiting for a core; pass --threads to measure more."""
QUIET_SHARE = 0.25
"""Other processes' share of the CPU capacity below which a measurement may start."""
QUIET_WINDOW = 1.0
"""Seconds over which that share is sampled."""
DISTURBED_SHARE = 0.2
"""A run during which other processes took more than this share of the CPU is run again:
a two-thread torch process with one core taken ran 30x slower here (S0 floor: 100 s, not 3 s)."""
ATTEMPTS = 3
"""Runs of one measurement at most, disturbed or not; the last is kept whatever its share."""
DEFAULT_SETTLE = 30.0
BARE_IMPORT = "import click, rich"
HELP_IMPORT_ROWS = 8
PACKAGES = ("torch", "onnxruntime", "onnx", "onnxsim", "coremltools", "numpy", "executorch",
            "litert-torch", "ai-edge-litert", "mobileone-cli")


# -- options -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    variants: tuple[str, ...]
    repeat: int
    export_repeat: int
    threads: int
    runs: int
    onnx_pairs: int
    help_runs: int
    out: Path
    workdir: Path | None
    settle: float
    """Longest wait, in seconds, for other jobs to leave the cores before each measurement."""
    compression: bool = False
    """Also run `quantize.py` (every `--quantize` mode through the pipeline) and add its table."""


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS),
                        help="comma-separated variants (default: s0,s1,s2,s3,s4)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each fold and floor measurement; the median is reported")
    parser.add_argument("--export-repeat", type=int, default=None,
                        help="runs of each export (default: --repeat); Core ML exports are slow")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="intra-op threads for every latency figure (default: 1)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help="timed runs per model in the latency table (default: 20)")
    parser.add_argument("--out", type=Path, default=HERE / "results.md",
                        help="Markdown file to write (default: benchmarks/results.md)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep checkpoints and exports here (default: a temporary folder)")
    parser.add_argument("--settle", type=float, default=DEFAULT_SETTLE,
                        help="before each measurement, wait up to this many seconds for other "
                             "jobs to leave the cores idle (default: 30; 0 to never wait)")
    parser.add_argument("--compression", action="store_true",
                        help="also measure every --quantize mode (benchmarks/quantize.py) and "
                             "add its table")
    parser.add_argument("--quick", action="store_true",
                        help="S0 and S4 only, every measurement once, fewer latency runs")
    args = parser.parse_args(argv)
    variants = tuple(name.strip().lower() for name in args.variants.split(",") if name.strip())
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown or not variants:
        parser.error(f"unknown variant {', '.join(unknown) or '(none)'}; choose from s0-s4")
    export_repeat = args.repeat if args.export_repeat is None else args.export_repeat
    if min(args.repeat, export_repeat, args.threads, args.runs) < 1:
        parser.error("--repeat, --export-repeat, --threads and --runs must be at least 1")
    if args.quick:
        return Settings(variants=QUICK_VARIANTS, repeat=1, export_repeat=1, threads=args.threads,
                        runs=min(args.runs, 10), onnx_pairs=40, help_runs=5, out=args.out,
                        workdir=args.workdir, settle=args.settle, compression=args.compression)
    return Settings(variants=variants, repeat=args.repeat, export_repeat=export_repeat,
                    threads=args.threads,
                    runs=args.runs, onnx_pairs=ONNX_PAIRS, help_runs=HELP_RUNS, out=args.out,
                    workdir=args.workdir, settle=args.settle, compression=args.compression)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the machine and how busy it was --------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def own_cpu_seconds() -> float:
    """CPU seconds of this process and every child it has waited for (the wrappers' included)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass
class Machine:
    """What the run ran on, and how much of it other jobs took meanwhile."""

    cpu: str = field(default_factory=cpu_model)
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    ram_gib: float | None = field(default_factory=ram_gib)
    versions: dict[str, str] = field(default_factory=versions)
    loads: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    busy_at_start: float | None = field(default_factory=busy_cpu_seconds)
    own_at_start: float = field(default_factory=own_cpu_seconds)
    waited: float = 0.0
    """Seconds spent waiting for other jobs to leave the cores."""
    started_busy: int = 0
    """Measurements that started although other jobs still held the cores."""
    disturbed: int = 0
    """Runs thrown away because other jobs took the cores while they ran."""

    def sample_load(self) -> None:
        self.loads.append(os.getloadavg()[0])

    def others_share(self) -> float | None:
        """Fraction of the machine's CPU capacity used by other processes during the run."""
        return others_share(self.busy_at_start, busy_cpu_seconds(),
                            own_cpu=own_cpu_seconds() - self.own_at_start,
                            seconds=time.perf_counter() - self.started)

    def settle(self, max_wait: float) -> None:
        """Wait, up to `max_wait` seconds, until other processes leave the cores nearly idle.

        The machine is shared: a test suite on one core already makes a two-thread
        torch process many times slower, so measuring in a quiet moment is worth a wait.
        """
        start = time.perf_counter()
        while True:
            before = busy_cpu_seconds()
            time.sleep(QUIET_WINDOW)
            share = others_share(before, busy_cpu_seconds(), own_cpu=0.0, seconds=QUIET_WINDOW)
            waited = time.perf_counter() - start
            if share is None or share < QUIET_SHARE:
                break
            if waited >= max_wait:
                self.started_busy += 1
                break
        self.waited += waited - QUIET_WINDOW  # the first sample is not a wait
        self.sample_load()


# -- measuring one command ---------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu_seconds: float
    peak_mib: float
    others_share: float | None
    """Share of the CPU capacity other processes used while this ran."""
    stdout: str


@dataclass(frozen=True)
class Measurement:
    """Repeated runs of one command; medians are what the tables show."""

    runs: tuple[Run, ...]

    @property
    def seconds(self) -> float:
        return statistics.median(run.seconds for run in self.runs)

    @property
    def best_seconds(self) -> float:
        return min(run.seconds for run in self.runs)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(run.cpu_seconds for run in self.runs)

    @property
    def worst_others_share(self) -> float | None:
        shares = [run.others_share for run in self.runs if run.others_share is not None]
        return max(shares) if shares else None

    @property
    def peak_mib(self) -> float:
        return statistics.median(run.peak_mib for run in self.runs)

    @property
    def worst_peak_mib(self) -> float:
        return max(run.peak_mib for run in self.runs)


def measure(command: list[str], *, label: str, machine: Machine, settle: float) -> Run:
    """One undisturbed run of `command` if `ATTEMPTS` tries give one; else the last try."""
    for attempt in range(1, ATTEMPTS + 1):
        machine.settle(settle)
        result = measure_once(command)
        if result.others_share is None or result.others_share <= DISTURBED_SHARE:
            break
        machine.disturbed += 1
        progress(f"  (other processes took {percent(result.others_share)} of the CPU during "
                 f"{label} ({result.seconds:.1f} s): "
                 + ("run again)" if attempt < ATTEMPTS else "kept, marked in the table)"))
    return result


def measure_once(command: list[str]) -> Run:
    """One run of `command` in its own wrapper process; a failed command stops the benchmark."""
    # With bytecode caching, as after `pip install`: the tool's modules (and the floors',
    # which import some of them) are read from .pyc files, not compiled on every run.
    completed = subprocess.run([sys.executable, str(HERE / "peak.py"), *command],
                               capture_output=True, text=True, check=True, env=with_bytecode())
    result = json.loads(completed.stdout)
    if result["returncode"] != 0:
        raise SystemExit(f"{' '.join(command)} exited {result['returncode']}:\n{result['stderr']}")
    return Run(seconds=result["seconds"], cpu_seconds=result["cpu_seconds"],
               peak_mib=result["peak_mib"], others_share=result["others_share"],
               stdout=result["stdout"])


def mobileone() -> list[str]:
    """The installed console script next to this Python, as a user runs it."""
    script = Path(sys.executable).with_name("mobileone")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mobileone_cli"]


# Every export target timed, with its file suffix and its column title.
EXPORTS = {"onnx": (".onnx", "ONNX"), "coreml": (".mlpackage", "Core ML"),
           "executorch": (".pte", "ExecuTorch"), "tflite": (".tflite", "LiteRT"),
           "ort": (".ort", "ORT")}
# The on-device files `report` times in their own runtimes, next to torch and onnxruntime.
ON_DEVICE = ("executorch", "tflite", "ort")


# `export --to all` and its floor, timed for the target variant only (a minute a run).
ALL = ("all", "floor_all")


def commands(variant: str, checkpoint: Path, workdir: Path) -> dict[str, list[str]]:
    """The measured commands of one variant: fold, its floor, each export, and for the
    target variant `export --to all` next to its floor."""
    tool = mobileone()
    stem = workdir / f"mobileone_{variant}"
    # The fp16 cost gates off: the seeded weights are random, and S2's two reference images
    # have near-tied top logits, so fp16 flips one (agreement 0.5 < 0.9) and nothing would be
    # written. Every proof and cost figure is still computed; only the verdict is not timed.
    no_gates = ["--min-agreement", "0", "--min-cosine", "0"]
    measured = {
        "fold": [*tool, "fold", str(checkpoint), "-o", f"{stem}.safetensors", "--force"],
        "floor": [sys.executable, str(HERE / "floor.py"), str(checkpoint), variant],
        **{name: [*tool, "export", str(checkpoint), "--to", name, "-o", f"{stem}{suffix}",
                  "--force", *no_gates] for name, (suffix, _title) in EXPORTS.items()},
    }
    if variant == TARGET_VARIANT:
        measured["all"] = [*tool, "export", str(checkpoint), "--to", "all", "-o",
                           str(workdir / f"bundle_{variant}"), "--force", *no_gates]
        measured["floor_all"] = [sys.executable, str(HERE / "floor_all.py"), str(checkpoint),
                                 variant]
    return measured


def measure_commands(checkpoints: dict[str, Path], settings: Settings, workdir: Path,
                     machine: Machine) -> dict[tuple[str, str], Measurement]:
    """Every command of every variant, repeated in rounds.

    Rounds (all variants, then all again) rather than back-to-back repeats, and
    each fold right next to its floor, so a change in the machine's load during
    the run lands on both sides of a ratio instead of on one of them.
    """
    runs: dict[tuple[str, str], list[Run]] = {}
    for round_index in range(max(settings.repeat, settings.export_repeat)):
        for variant, checkpoint in checkpoints.items():
            for name, command in commands(variant, checkpoint, workdir).items():
                limit = (settings.export_repeat if name in EXPORTS or name in ALL
                         else settings.repeat)
                if round_index >= limit:
                    continue
                result = measure(command, label=f"{variant} {name}", machine=machine,
                                 settle=settings.settle)
                progress(f"  round {round_index + 1}: {variant} {name:<6} "
                         f"{result.seconds:7.1f} s (CPU {result.cpu_seconds:6.1f} s) "
                         f"{result.peak_mib:6.0f} MiB  others {percent(result.others_share)}")
                runs.setdefault((variant, name), []).append(result)
    return {key: Measurement(tuple(value)) for key, value in runs.items()}


def floor_phases(measurement: Measurement) -> tuple[dict[str, float], float]:
    """Median seconds of each phase of the floor script, and its fold's worst relative error."""
    reports = [json.loads(run.stdout) for run in measurement.runs]
    phases = {name: statistics.median(report["phases"][name] for report in reports)
              for name in reports[0]["phases"]}
    return phases, max(report["max_rel_diff"] for report in reports)


# -- ONNX: ours against the hand-made export -------------------------------------------------


@dataclass(frozen=True)
class OnnxRace:
    variant: str
    ours_ms: float
    handmade_ms: float
    pair_ratios: tuple[float, ...]
    control_ratio: float
    """The hand-made file raced against a byte-identical copy: the comparison's resolution."""
    others_share: float | None
    """Largest share of the CPU capacity other processes used while kept pairs ran."""
    max_abs_diff: float
    ours_ops: dict[str, int]
    handmade_ops: dict[str, int]

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.handmade_ms

    def ratio_quartiles(self) -> tuple[float, float]:
        quartiles = statistics.quantiles(self.pair_ratios, n=4)
        return quartiles[0], quartiles[2]


Runner = Callable[[], object]


def time_pairs(runners: Sequence[Runner], pairs: int) -> tuple[list[list[float]], float | None]:
    """Seconds of each runner over `pairs` interleaved pairs, and the others' CPU share meanwhile.

    ABBA order: neither model always runs first (caches, frequency steps), and a
    change in the machine's load lands on both.
    """
    seconds: list[list[float]] = [[] for _ in runners]
    busy_before, own_before, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    for pair in range(pairs):
        for index in ((0, 1) if pair % 2 == 0 else (1, 0)):
            begin = time.perf_counter()
            runners[index]()
            seconds[index].append(time.perf_counter() - begin)
    share = others_share(busy_before, busy_cpu_seconds(), own_cpu=own_cpu_seconds() - own_before,
                         seconds=time.perf_counter() - start)
    return seconds, share


def settled_pairs(runners: Sequence[Runner], pairs: int, *, label: str, settings: Settings,
                  machine: Machine) -> tuple[list[list[float]], float | None]:
    """`time_pairs` in a quiet moment, after warm-up; timed again if other jobs took the cores."""
    for attempt in range(1, ATTEMPTS + 1):
        machine.settle(settings.settle)
        time_pairs(runners, ONNX_WARMUP)
        seconds, share = time_pairs(runners, pairs)
        if share is None or share <= DISTURBED_SHARE or attempt == ATTEMPTS:
            break
        machine.disturbed += 1
        progress(f"  (other processes took {percent(share)} of the CPU during {label}: "
                 "run again)")
    return seconds, share


def race(paths: tuple[Path, Path], *, label: str, settings: Settings, machine: Machine
         ) -> tuple[list[list[float]], float | None]:
    """Latencies of two ONNX files, interleaved, over `ONNX_SESSIONS` fresh pairs of sessions."""
    from mobileone_cli.report import onnx_runner

    seconds: list[list[float]] = [[], []]
    shares = []
    for session in range(ONNX_SESSIONS):
        # Alternate which session is created first: allocation order moves memory layout.
        order = (0, 1) if session % 2 == 0 else (1, 0)
        created = {index: onnx_runner(paths[index], batch=1, size=(INPUT_SIZE, INPUT_SIZE),
                                      threads=settings.threads) for index in order}
        timed, share = settled_pairs([created[0], created[1]],
                                     max(1, settings.onnx_pairs // ONNX_SESSIONS),
                                     label=label, settings=settings, machine=machine)
        for index in (0, 1):
            seconds[index].extend(timed[index])
        if share is not None:
            shares.append(share)
    return seconds, max(shares) if shares else None


def race_onnx(variant: str, ours: Path, folded: Path, workdir: Path, settings: Settings,
              machine: Machine) -> OnnxRace:
    """Latency of our export against the hand-made one (same weights), and an A/A control."""
    import shutil

    import handmade
    import numpy as np

    from mobileone_cli.export.onnx import op_counts
    from mobileone_cli.report import onnx_runner

    theirs = workdir / f"handmade_{variant}.onnx"
    handmade.export(handmade.build(folded), theirs, size=INPUT_SIZE)
    copy = shutil.copyfile(theirs, workdir / f"handmade_{variant}_copy.onnx")
    outputs = [np.asarray(onnx_runner(path, batch=1, size=(INPUT_SIZE, INPUT_SIZE),
                                      threads=settings.threads)()[0])  # type: ignore[index]
               for path in (ours, theirs)]
    seconds, share = race((ours, theirs), label=f"the {variant} ONNX race", settings=settings,
                          machine=machine)
    control, control_share = race((theirs, copy), label=f"the {variant} ONNX control",
                                  settings=settings, machine=machine)
    shares = [value for value in (share, control_share) if value is not None]
    return OnnxRace(
        variant=variant,
        ours_ms=statistics.median(seconds[0]) * 1000,
        handmade_ms=statistics.median(seconds[1]) * 1000,
        pair_ratios=tuple(a / b for a, b in zip(seconds[0], seconds[1])),
        control_ratio=statistics.median(control[0]) / statistics.median(control[1]),
        others_share=max(shares) if shares else None,
        max_abs_diff=float(np.abs(outputs[0] - outputs[1]).max()),
        ours_ops=op_counts(ours),
        handmade_ops=op_counts(theirs),
    )


# -- --help ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HelpRace:
    help_ms: float
    bare_ms: float
    torch_modules: tuple[str, ...]
    extra_imports: tuple[tuple[str, int, float], ...]
    """What `--help` imports beyond `import click, rich`: (package, modules, self ms), heaviest
    first; `-X importtime` figures, which its own bookkeeping inflates a little."""

    @property
    def ratio(self) -> float:
        return self.help_ms / self.bare_ms


def with_bytecode() -> dict[str, str]:
    """This environment, minus PYTHONDONTWRITEBYTECODE: an installed package has its .pyc
    files (pip compiles it, as it compiled click and rich), so `--help` is timed with ours
    cached too, not compiled from source on every run while the bare import is not."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=with_bytecode())
    return time.perf_counter() - start


def import_times(arguments: list[str]) -> dict[str, float]:
    """Module -> its own import milliseconds, for every import `python -X importtime` reports."""
    completed = subprocess.run([sys.executable, "-X", "importtime", *arguments],
                               capture_output=True, text=True, check=True)
    found = {}
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, _, name = line.removeprefix("import time:").split("|")
        found[name.strip()] = int(own) / 1000
    return found


def extra_imports(imported: dict[str, float], bare: dict[str, float]
                  ) -> tuple[tuple[str, int, float], ...]:
    """Modules in `imported` but not in `bare`, grouped by top-level package."""
    groups: dict[str, list[float]] = {}
    for name, own_ms in imported.items():
        if name not in bare:
            groups.setdefault(name.split(".")[0], []).append(own_ms)
    return tuple(sorted(((package, len(times), sum(times)) for package, times in groups.items()),
                        key=lambda group: -group[2]))


def race_help(settings: Settings) -> HelpRace:
    """`mobileone --help` against a bare import of click and rich, interleaved."""
    help_command = [*mobileone(), "--help"]
    bare_command = [sys.executable, "-c", BARE_IMPORT]
    for command in (help_command, bare_command):
        wall_time(command)  # untimed: warms the page cache for both
    help_times, bare_times = [], []
    for _ in range(settings.help_runs):
        help_times.append(wall_time(help_command))
        bare_times.append(wall_time(bare_command))
    imported = import_times(["-m", "mobileone_cli", "--help"])
    return HelpRace(
        help_ms=statistics.median(help_times) * 1000,
        bare_ms=statistics.median(bare_times) * 1000,
        torch_modules=tuple(name for name in imported
                            if name == "torch" or name.startswith("torch.")),
        extra_imports=extra_imports(imported, import_times(["-c", BARE_IMPORT])),
    )


# -- the latency table -------------------------------------------------------------------


def latency_report(variant: str, checkpoint: Path, stem: Path, settings: Settings) -> Report:
    """`mobileone report CHECKPOINT ONNX PTE TFLITE ORT` through its API: every runtime
    side by side, timed in the same interleaved rounds."""
    from mobileone_cli import api
    from mobileone_cli.options import ReportOptions

    files = [stem.with_suffix(EXPORTS[name][0]) for name in ("onnx", *ON_DEVICE)]
    return api.report(ReportOptions(sources=(checkpoint, *files), batch=1,
                                    size=(INPUT_SIZE, INPUT_SIZE), threads=settings.threads,
                                    runs=settings.runs))


def latency_row(variant: str, report: Report) -> list[str]:
    checkpoint_row, onnx_row, *device_rows = report.rows
    torch_ms = {item.model: item.median_ms for item in checkpoint_row.latency}
    # The ONNX row also times its weights in torch eager; that repeats the folded figure.
    onnx_ms = next(item.median_ms for item in onnx_row.latency if item.model == "onnx")
    device_ms = [f"{row.latency[0].median_ms:.1f}" for row in device_rows]
    fused = checkpoint_row.fused
    assert fused is not None and checkpoint_row.speedup is not None
    return [variant.upper(), f"{fused.params / 1e6:.2f} M", f"{fused.macs / 1e6:.0f} M",
            f"{torch_ms['train']:.1f}", f"{torch_ms['fused']:.1f}", f"{onnx_ms:.1f}",
            *device_ms, f"{checkpoint_row.speedup:.2f}x"]


# -- targets and tables ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    ratio: float
    limit: float
    digits: int = 2
    """Decimals shown; 0 for a count."""

    @property
    def passed(self) -> bool:
        # At the precision the limit is written in: a ratio of 1.003 meets "at most 1.00";
        # the medians' run-to-run noise is larger than the third decimal anyway.
        return round(self.ratio, self.digits) <= self.limit

    def row(self) -> list[str]:
        return [self.name, self.measured, f"{self.ratio:.{self.digits}f}",
                f"≤ {self.limit:.{self.digits}f}", "PASS" if self.passed else "FAIL"]


def paired(ours: Measurement, floor: Measurement, *, name: str, limit: float) -> Target:
    """Ours over its floor: the medians' ratio, and every round's pair (the run right next
    to its floor), so one lucky round cannot hide the others; fails if any pair is over."""
    pairs = [run.seconds / base.seconds for run, base in zip(ours.runs, floor.runs)]
    worst = max(pairs)
    median = ours.seconds / floor.seconds
    return Target(name, f"medians {ours.seconds:.1f} s / {floor.seconds:.1f} s; each round: "
                  + ", ".join(f"{ratio:.2f}" for ratio in pairs),
                  median if round(worst, 2) <= limit else worst, limit)


def fold_targets(fold: Measurement, floor: Measurement) -> list[Target]:
    return [
        paired(fold, floor, name=f"`fold` {TARGET_VARIANT.upper()} time / floor time",
               limit=FOLD_TIME_LIMIT),
        Target(f"`fold` {TARGET_VARIANT.upper()} peak memory / {FOLD_MEMORY_LIMIT_MIB:.0f} MiB",
               f"{fold.worst_peak_mib:.0f} MiB (worst of {len(fold.runs)}; floor "
               f"{floor.worst_peak_mib:.0f} MiB)",
               fold.worst_peak_mib / FOLD_MEMORY_LIMIT_MIB, 1.0),
    ]


def onnx_target(race: OnnxRace) -> Target:
    low, high = race.ratio_quartiles()
    return Target(f"ONNX latency {race.variant.upper()}: ours / hand-made",
                  f"{race.ours_ms:.2f} ms / {race.handmade_ms:.2f} ms = {race.ratio:.3f} "
                  f"(pairs {low:.3f}-{high:.3f}; A/A control {race.control_ratio:.3f})",
                  race.ratio, ONNX_LATENCY_LIMIT)


def help_targets(race: HelpRace) -> list[Target]:
    imported = ", ".join(race.torch_modules[:3]) or "none"
    return [
        Target("`mobileone --help` / `import click, rich`",
               f"{race.help_ms:.0f} ms / {race.bare_ms:.0f} ms", race.ratio, HELP_TIME_LIMIT),
        Target("torch modules imported by `--help`", imported, len(race.torch_modules), 0,
               digits=0),
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; every column after the first right-aligned (they are numbers)."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["--:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def command_rows(measurements: dict[tuple[str, str], Measurement],
                 variants: Sequence[str]) -> list[list[str]]:
    def seconds(measurement: Measurement) -> str:
        if len(measurement.runs) == 1:
            return f"{measurement.seconds:.1f}"
        return f"{measurement.seconds:.1f} ({measurement.best_seconds:.1f})"

    rows = []
    for variant in variants:
        fold, floor = measurements[variant, "fold"], measurements[variant, "floor"]
        exports = [measurements[variant, name] for name in EXPORTS]
        shares = [m.worst_others_share for m in (fold, floor, *exports)]
        rows.append([variant.upper(), seconds(fold), f"{fold.peak_mib:.0f}", seconds(floor),
                     f"{floor.peak_mib:.0f}", f"{fold.seconds / floor.seconds:.2f}",
                     *(cell for export in exports
                       for cell in (seconds(export), f"{export.peak_mib:.0f}")),
                     percent(max((s for s in shares if s is not None), default=None))])
    return rows


def percent(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def onnx_rows(races: Sequence[OnnxRace]) -> list[list[str]]:
    def ops(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} {count}" for name, count in counts.items())

    return [[race.variant.upper(), f"{race.ours_ms:.2f}", f"{race.handmade_ms:.2f}",
             f"{race.ratio:.3f}", "{:.3f}-{:.3f}".format(*race.ratio_quartiles()),
             f"{race.control_ratio:.3f}", percent(race.others_share),
             f"{race.max_abs_diff:.1e}", ops(race.ours_ops), ops(race.handmade_ops)]
            for race in races]


def machine_section(machine: Machine, settings: Settings) -> str:
    ram = f"{machine.ram_gib:.1f} GiB RAM" if machine.ram_gib else "RAM unknown"
    stack = ", ".join(f"{name} {version}" for name, version in machine.versions.items())
    share = machine.others_share()
    loads = machine.loads or [os.getloadavg()[0]]
    disturbed = (share is not None and share > 0.1) or machine.started_busy > 0
    verdict = ("other jobs competed for the cores: absolute times are inflated, the ratios "
               "pair runs made side by side" if disturbed else "the machine was otherwise quiet")
    hardware = (f"- **Machine**: {machine.cpu}, {machine.cores} cores, {ram}, "
                f"{platform.system()} {platform.release()}")
    load = (f"- **Load average** (1 min): {loads[0]:.2f} at start, {loads[-1]:.2f} at end, "
            f"{min(loads):.2f}-{max(loads):.2f} before the measurements (this benchmark itself "
            f"accounts for up to 1); other processes used {percent(share)} of the CPU capacity "
            f"over the whole run: {verdict}.")
    quiet = (f"- **Quiet moments**: each measurement waited up to {settings.settle:.0f} s for "
             f"other processes to use under {QUIET_SHARE:.0%} of the CPU capacity; "
             f"{machine.waited:.0f} s spent waiting, {machine.started_busy} measurement(s) "
             f"started while the cores were still busy; {machine.disturbed} run(s) during which "
             f"other processes took over {DISTURBED_SHARE:.0%} of the CPU were run again (at "
             f"most {ATTEMPTS} tries).")
    repeats = (f"- **Settings**: medians of {settings.repeat} fold/floor runs and "
               f"{settings.export_repeat} export runs per variant; latency with "
               f"{settings.threads} intra-op thread(s), batch 1, {INPUT_SIZE}x{INPUT_SIZE}.")
    return "\n".join([hardware, f"- **Stack**: {stack}", load, quiet, repeats])


# -- the run -----------------------------------------------------------------------------


@contextmanager
def working_folder(settings: Settings) -> Iterator[Path]:
    if settings.workdir is not None:
        settings.workdir.mkdir(parents=True, exist_ok=True)
        yield settings.workdir
        return
    with tempfile.TemporaryDirectory(prefix="mobileone-bench-") as folder:
        yield Path(folder)


def make_checkpoints(variants: Sequence[str], workdir: Path) -> dict[str, Path]:
    """Seeded train-time checkpoints, as a training script saves them (a bare state dict)."""
    from mobileone_cli.synthetic import make_checkpoint

    checkpoints = {}
    for variant in variants:
        progress(f"generating the {variant.upper()} train-time checkpoint")
        checkpoints[variant] = make_checkpoint(workdir / f"{variant}_train.pth", variant=variant,
                                               seed=0)
    return checkpoints


def timed(label: str, step: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = step()
    progress(f"{label}: {time.perf_counter() - start:.0f} s")
    return result


def measure_latencies(checkpoints: dict[str, Path], settings: Settings, workdir: Path,
                      machine: Machine) -> tuple[list[OnnxRace], dict[str, Report]]:
    """The ONNX race and the `report` latency table of every variant, each in a quiet moment."""
    races, reports = [], {}
    for variant, checkpoint in checkpoints.items():
        stem = workdir / f"mobileone_{variant}"
        races.append(race_onnx(variant, stem.with_suffix(".onnx"),
                               stem.with_suffix(".safetensors"), workdir, settings, machine))
        progress(f"  {variant} ONNX ours / hand-made: {races[-1].ratio:.3f}")
        machine.settle(settings.settle)
        reports[variant] = latency_report(variant, checkpoint, stem, settings)
    return races, reports


def benchmark(settings: Settings) -> str:
    """Every measurement; returns the Markdown report."""
    machine = Machine()
    machine.sample_load()
    with working_folder(settings) as workdir:
        checkpoints = timed("checkpoints", lambda: make_checkpoints(settings.variants, workdir))
        measurements = timed("fold and export", lambda: measure_commands(
            checkpoints, settings, workdir, machine))
        races, reports = timed("latency", lambda: measure_latencies(
            checkpoints, settings, workdir, machine))
        machine.settle(settings.settle)
        help_race = timed("--help", lambda: race_help(settings))
        machine.sample_load()
    return render(settings, machine, measurements, races, reports, help_race)


def render(settings: Settings, machine: Machine,
           measurements: dict[tuple[str, str], Measurement], races: Sequence[OnnxRace],
           reports: dict[str, Report], help_race: HelpRace) -> str:
    targets = [onnx_target(race) for race in races] + help_targets(help_race)
    sections = []
    if TARGET_VARIANT in settings.variants:
        fold, floor = measurements[TARGET_VARIANT, "fold"], measurements[TARGET_VARIANT, "floor"]
        every, floor_all = (measurements[TARGET_VARIANT, "all"],
                            measurements[TARGET_VARIANT, "floor_all"])
        targets = [*fold_targets(fold, floor),
                   paired(every, floor_all, name=f"`export --to all` {TARGET_VARIANT.upper()} "
                          "time / sum of its parts", limit=ALL_TIME_LIMIT), *targets]
        phases, error = floor_phases(floor)
        sections.append(f"### Where the {TARGET_VARIANT.upper()} floor's time goes\n\n" + table(
            ["phase", "seconds"], [[name, f"{seconds:.2f}"] for name, seconds in phases.items()])
            + f"\n\nThe floor's own fold reproduces the train-time model to {error:.1e} "
            "(relative), so it did the real work.")
        parts, _ = floor_phases(floor_all)
        sections.append(
            f"### `export --to all` {TARGET_VARIANT.upper()} against the sum of its parts\n\n"
            f"`export --to all` (a bundle of six proven targets): median {every.seconds:.1f} s, "
            f"peak {every.peak_mib:.0f} MiB. *Sum of the parts*: `benchmarks/floor_all.py`, "
            "the fold's floor, then each target converted by hand the shortest way its "
            "converter documents and run once in its own runtime (Core ML is converted, not "
            f"run: there is no runtime for it here): median {floor_all.seconds:.1f} s, peak "
            f"{floor_all.peak_mib:.0f} MiB. Its phases (a converter's import is timed in the "
            "first phase that needs it):\n\n" + table(
                ["phase", "seconds"], [[name, f"{seconds:.2f}"] for name, seconds in parts.items()]))
    threads = f"{settings.threads} thread{'s' if settings.threads > 1 else ''}"
    command_line = " ".join(["benchmarks/run.py", *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n\n".join([
        "# mobileone benchmarks",
        f"Written by `{command_line}` on {date}.",
        machine_section(machine, settings),
        "## Targets\n\n" + table(["target", "measured", "ratio", "limit", "verdict"],
                                 [target.row() for target in targets]),
        "## `fold` and `export`: wall time and peak memory\n\n"
        "Each command in its own process, end to end (interpreter start-up included): "
        "median wall seconds (best in brackets) and median MiB of peak RSS. *Floor*: "
        "`benchmarks/floor.py`, the work a fold cannot avoid. Core ML exports are fp16 (the "
        "default). *Others*: the largest share of the CPU capacity other processes took during "
        "any of the row's runs.\n\n" + table(
            ["variant", "fold s", "fold MiB", "floor s", "floor MiB", "fold / floor",
             *(cell for _suffix, title in EXPORTS.values()
               for cell in (f"{title} export s", f"{title} MiB")), "others"],
            command_rows(measurements, settings.variants)),
        *sections,
        f"## ONNX: our export against the hand-made one\n\nonnxruntime CPU, {threads}, batch 1, "
        f"{INPUT_SIZE}x{INPUT_SIZE}, {ONNX_SESSIONS} fresh pairs of sessions, each "
        f"with {ONNX_WARMUP} warm-up pairs, then {settings.onnx_pairs} interleaved pairs in all; "
        "median ms. *Pairs*: quartiles of the per-pair ratio. *A/A control*: the hand-made "
        "file raced the same way against a byte-identical copy of itself, the resolution of "
        "the comparison. Hand-made: `benchmarks/handmade.py` (timm-style fused model, "
        "`torch.onnx.export`, onnxsim). *Others*: the largest CPU share other processes took "
        "while pairs ran.\n\n"
        + table(["variant", "ours ms", "hand-made ms", "ours / hand-made", "pairs", "A/A control",
                 "others", "max |Δ| logits", "ours: ops", "hand-made: ops"], onnx_rows(races)),
        f"## Latency (`mobileone report`)\n\nMedian ms of {settings.runs} runs after 5 warm-up "
        f"runs, batch 1, {INPUT_SIZE}x{INPUT_SIZE}, {threads}, every model timed in the same "
        "interleaved rounds; train-time and folded in torch eager, ONNX in onnxruntime, "
        "the .pte in ExecuTorch (XNNPACK), the .tflite in LiteRT (XNNPACK), the .ort in "
        "onnxruntime; params and MACs of the folded model.\n\n" + table(
            ["variant", "params", "MACs", "train-time ms", "folded ms", "ONNX ms",
             "ExecuTorch ms", "LiteRT ms", "ORT ms", "speed-up (train / folded)"],
            [latency_row(variant, report) for variant, report in reports.items()]),
        f"## `mobileone --help`\n\nMedian of {settings.help_runs} interleaved runs: "
        f"{help_race.help_ms:.0f} ms, against {help_race.bare_ms:.0f} ms for "
        f"`python -c \"{BARE_IMPORT}\"`. What `--help` imports beyond that (`-X importtime`, "
        "own time of each module, grouped by package):\n\n"
        + table(["package", "modules", "ms"],
                [[package, str(count), f"{ms:.1f}"]
                 for package, count, ms in help_race.extra_imports[:HELP_IMPORT_ROWS]]),
    ]) + "\n"


def compression_section(settings: Settings) -> str:
    """`quantize.py`'s table: every `--quantize` mode of every target through `api.export`."""
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "quantize.md"
        progress("measuring every --quantize mode (benchmarks/quantize.py)")
        subprocess.run([sys.executable, str(HERE / "quantize.py"), "--runs", str(settings.runs),
                        "--out", str(table)], check=True, cwd=HERE.parent,
                       env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        return ("\n## Compression: every `--quantize` mode through the pipeline\n\n"
                + table.read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.perf_counter()
    report = benchmark(settings)
    if settings.compression:
        report += compression_section(settings)
    print(report)
    settings.out.write_text(report, encoding="utf-8")
    progress(f"wrote {settings.out} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

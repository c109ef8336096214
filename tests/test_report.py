"""`report`: params and MACs against the paper's table, per-stage sums, latency, the command."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fixtures.generate import canonical_state, spec_of
from mobileone_cli import report as report_module
from mobileone_cli.cli import main
from mobileone_cli.errors import BadCheckpointError, UsageError
from mobileone_cli.fold import fold_state
from mobileone_cli.model import MobileOne, build_model
from mobileone_cli.report import (
    MAC_CONVENTION,
    Complexity,
    Latency,
    ReportOptions,
    measure_complexity,
    measure_latency,
    per_stage,
    percentile,
    report_sources,
    torch_runner,
)
from mobileone_cli.variants import VARIANTS, ArchitectureSpec, build_spec

# MobileOne paper (Vasu et al., CVPR 2023), Table 8: params (M) and FLOPs (M) at 224 x 224.
PAPER_TABLE = {
    "s0": (2.1, 275),
    "s1": (4.8, 825),
    "s2": (7.8, 1299),
    "s3": (10.1, 1896),
    "s4": (14.8, 2978),
}
# What this counter measures at 224 x 224 (conv + linear MACs, squeeze-excite included).
# S2 and S4 land one off the paper's digits, in opposite directions: S4 is 2977.6 M
# without its squeeze-excite convs (1.63 M), and no conv + linear count gives S2's
# 1299 (1298.4 M); adding one op per element of the head's global pool (0.1 M) would.
# The paper's counter evidently differed in such details; params match exactly.
MEASURED_FOLDED = {
    "s0": (2_078_504, 275_110_400),
    "s1": (4_764_840, 825_057_024),
    "s2": (7_808_168, 1_298_426_496),
    "s3": (10_078_312, 1_895_790_592),
    "s4": (14_838_352, 2_979_269_760),
}
MEASURED_TRAIN = {
    "s0": (5_293_272, 1_051_935_232),
    "s1": (4_825_192, 830_062_080),
    "s2": (7_884_648, 1_304_027_392),
    "s3": (10_170_600, 1_902_112_768),
    "s4": (14_951_248, 2_986_802_432),
}
LATENCY_KEYS = {"runtime", "model", "batch", "size", "threads", "runs", "median_ms", "p90_ms",
                "images_per_second"}


def meta_model(spec: ArchitectureSpec) -> MobileOne:
    """Shapes without weights: counting needs no arithmetic, so no memory or init time."""
    with torch.device("meta"):
        return MobileOne(spec).eval()


@pytest.mark.parametrize("variant", sorted(PAPER_TABLE))
def test_folded_variants_match_the_papers_table(variant: str) -> None:
    with torch.device("meta"):  # the same model without weights: counting needs only shapes
        model = build_model(build_spec(VARIANTS[variant]).folded())
    measured = measure_complexity(model, size=(224, 224))
    paper_params, paper_macs = PAPER_TABLE[variant]
    assert round(measured.params / 1e6, 1) == paper_params
    assert abs(round(measured.macs / 1e6) - paper_macs) <= 1
    assert (measured.params, measured.macs) == MEASURED_FOLDED[variant]


@pytest.mark.parametrize("variant", sorted(MEASURED_TRAIN))
def test_train_time_counts_include_every_branch(variant: str) -> None:
    spec = build_spec(VARIANTS[variant])
    measured = measure_complexity(meta_model(spec))
    assert (measured.params, measured.macs) == MEASURED_TRAIN[variant]
    # Folding removes branches, never arithmetic the folded model needs.
    assert measured.macs > MEASURED_FOLDED[variant][1]


def test_squeeze_excite_convs_count_as_convs() -> None:
    spec = build_spec(VARIANTS["s4"]).folded()
    without_se = replace(spec, stages=tuple(
        tuple(replace(block, se_channels=0) for block in stage) for stage in spec.stages))
    se_macs = sum(2 * block.out_channels * block.se_channels for block in spec.blocks)
    assert se_macs == 1_628_160
    difference = measure_complexity(meta_model(spec)).macs - measure_complexity(
        meta_model(without_se)).macs
    assert difference == se_macs


def test_only_conv_and_linear_count() -> None:
    """A one-conv, one-linear model: MACs are exactly the two layers' multiply-accumulates."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=True),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    measured = measure_complexity(model, size=(10, 12))
    assert measured.macs == 8 * 10 * 12 * 3 * 3 * 3 + 8 * 5
    assert measured.params == (8 * 3 * 9 + 8) + (8 + 8) + (8 * 5 + 5)
    assert measured.to_dict() == {"params": measured.params, "macs": measured.macs}


@pytest.mark.parametrize(("variant", "folded", "num_classes"),
                         [("s4", True, 1000), ("s1", False, 1000), ("s0", True, None)])
def test_per_stage_sums_equal_the_whole_model(variant: str, folded: bool,
                                              num_classes: int | None) -> None:
    spec = spec_of(variant, num_classes=num_classes)
    model = meta_model(spec.folded() if folded else spec)
    stages = per_stage(model, size=(64, 96))
    whole = measure_complexity(model, size=(64, 96))
    assert sum(stage.params for stage in stages) == whole.params
    assert sum(stage.macs for stage in stages) == whole.macs
    names = ["stem", "stage 1", "stage 2", "stage 3", "stage 4"]
    assert [stage.name for stage in stages] == names + (["head"] if num_classes else [])
    assert stages[0].output_shape == (1, spec.stem.out_channels, 32, 48)
    assert stages[4].output_shape == (1, spec.feature_channels, 2, 3)
    if num_classes:
        assert stages[-1].output_shape == (1, num_classes)
        assert stages[-1].macs == spec.feature_channels * num_classes
    assert all(stage.macs > 0 for stage in stages)


def test_measure_latency_reports_median_and_p90_of_the_timed_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: each call of `run` takes the next duration; warm-up runs are not timed."""
    durations = iter([9.0, 9.0, 0.010, 0.030, 0.020, 0.050, 0.040])
    now = [0.0]

    def run() -> None:
        now[0] += next(durations)

    monkeypatch.setattr(report_module.time, "perf_counter", lambda: now[0])
    latency = measure_latency(run, runtime="torch-eager", model="fused", batch=4,
                              size=(32, 48), threads=3, runs=5, warmup=2)
    assert latency.median_ms == pytest.approx(30.0)
    assert latency.p90_ms == pytest.approx(46.0)  # between 40 and 50 ms, numpy's interpolation
    assert latency.images_per_second == pytest.approx(4 / 0.030)
    assert (latency.runs, latency.threads, latency.size) == (5, 3, (32, 48))


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([5.0], 0.9) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.9) == pytest.approx(3.7)


def test_torch_runner_latency_on_a_tiny_setting() -> None:
    model = build_model(spec_of("s0").folded())
    runner = torch_runner(model, batch=1, size=(32, 32), threads=1)
    assert runner().shape == (1, 1000)  # type: ignore[attr-defined]
    latency = measure_latency(runner, runtime="torch-eager", model="fused", batch=1,
                              size=(32, 32), threads=1, runs=1, warmup=0)
    assert isinstance(latency, Latency)
    assert set(latency.to_dict()) == LATENCY_KEYS
    for figure in (latency.median_ms, latency.p90_ms, latency.images_per_second):
        assert figure > 0 and math.isfinite(figure)


def test_zero_runs_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="runs must be at least 1"):
        measure_latency(lambda: None, runtime="torch-eager", model="fused", batch=1,
                        size=(32, 32), threads=1, runs=0, warmup=0)


@pytest.fixture(scope="module")
def folded_s0_state() -> dict[str, torch.Tensor]:
    return fold_state(spec_of("s0"), canonical_state("s0"))


@pytest.fixture(scope="module")
def onnx_s0(folded_s0_state: dict[str, torch.Tensor],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mobileone_cli.export.onnx import export
    from mobileone_cli.options import OnnxOptions

    path = tmp_path_factory.mktemp("onnx") / "s0.onnx"
    export(build_model(spec_of("s0").folded(), folded_s0_state), path,
           metadata={"mobileone.variant": "s0"}, options=OnnxOptions(), input_size=64)
    return path


def test_onnx_source_is_timed_in_onnxruntime_and_mapped_back(onnx_s0: Path) -> None:
    before = torch.get_num_threads()
    result = report_sources(ReportOptions(sources=(onnx_s0,), size=(64, 64), threads=1, runs=1,
                                          warmup=0))
    assert torch.get_num_threads() == before  # the process-wide setting is put back
    [row] = result.rows
    assert (row.kind, row.variant, row.train, row.speedup) == ("onnx", "s0", None, None)
    # Params from the file's initializers; MACs counted on the model they map back to.
    assert row.fused == measure_complexity(build_model(spec_of("s0").folded()), size=(64, 64))
    assert [(item.runtime, item.model) for item in row.latency] == [
        ("torch-eager", "fused"), ("onnxruntime", "onnx")]
    assert all(item.threads == 1 and item.median_ms > 0 for item in row.latency)
    assert row.file_bytes == onnx_s0.stat().st_size


def test_static_onnx_refuses_another_size_and_names_the_fix(onnx_s0: Path) -> None:
    with pytest.raises(UsageError, match="takes input 1 x 3 x 64 x 64") as caught:
        report_sources(ReportOptions(sources=(onnx_s0,), size=(96, 64), runs=1, warmup=0))
    assert caught.value.hint is not None and "--size 64 64 --batch 1" in caught.value.hint


def test_a_file_that_is_not_onnx_is_a_bad_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(BadCheckpointError, match="not a readable ONNX file"):
        report_sources(ReportOptions(sources=(path,), latency=False))


def test_too_small_an_input_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="too small"):
        report_sources(ReportOptions(sources=(tmp_path / "never-read.pth",), size=(16, 224)))


# -- the command --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s0_sources(folded_s0_state: dict[str, torch.Tensor],
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A train-time S0 checkpoint (Apple layout) and its folded safetensors file."""
    from safetensors.torch import save_file

    from fixtures.generate import state_in_layout

    folder = tmp_path_factory.mktemp("report")
    train = folder / "s0_train.pth"
    torch.save(state_in_layout(canonical_state("s0"), "apple"), train)
    folded = folder / "s0_folded.safetensors"
    save_file(folded_s0_state, str(folded))
    return train, folded


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["report", *(str(arg) for arg in args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_report_json_has_the_documented_keys(s0_sources: tuple[Path, Path]) -> None:
    train, folded = s0_sources
    code, stdout, stderr = invoke(train, folded, "--json", "--runs", "1", "--warmup", "0",
                                  "--size", "64", "64", "--threads", "1")
    assert code == 0, stderr
    payload = json.loads(stdout)  # exactly one JSON object, nothing else on stdout
    assert payload["mac_convention"] == MAC_CONVENTION
    assert (payload["batch"], payload["size"], payload["threads"], payload["runs"]) == (
        1, [64, 64], 1, 1)
    first, second = payload["sources"]
    assert (first["source"], first["kind"], first["variant"]) == (str(train), "train-time", "s0")
    assert first["train"]["params"] == MEASURED_TRAIN["s0"][0]
    assert first["fused"]["params"] == MEASURED_FOLDED["s0"][0]
    assert first["train"]["macs"] > first["fused"]["macs"] > 0
    assert [(item["runtime"], item["model"]) for item in first["latency"]] == [
        ("torch-eager", "train"), ("torch-eager", "fused")]
    for item in first["latency"] + second["latency"]:
        assert set(item) == LATENCY_KEYS and item["size"] == [64, 64]
        assert item["median_ms"] > 0 and item["images_per_second"] > 0
    assert first["speedup"] > 0
    assert first["file_bytes"] == train.stat().st_size and first["stages"] is None
    # An already-folded file has no train-time model to compare against.
    assert (second["kind"], second["train"], second["speedup"]) == ("folded", None, None)
    assert second["fused"] == first["fused"]


def test_report_table_says_the_convention_and_the_change(s0_sources: tuple[Path, Path]) -> None:
    train, _ = s0_sources
    code, stdout, stderr = invoke(train, "--no-latency", "--per-stage", "--size", "64", "64",
                                  "--threads", "1")
    assert code == 0, stderr
    assert MAC_CONVENTION in stdout and "thread" not in stdout  # nothing timed, no threads
    assert str(train) in stdout and "S0" in stdout
    assert "5.29 → 2.08" in stdout  # params train-time → folded, in millions
    assert "ms median" not in stdout  # no latency columns without --latency
    assert "by stage" in stdout and "stage 4" in stdout and "1024 x 2 x 2" in stdout


def test_report_refuses_a_too_small_size_as_a_usage_error(s0_sources: tuple[Path, Path]) -> None:
    code, stdout, stderr = invoke(s0_sources[0], "--size", "16", "16")
    assert code == 2 and stdout == ""
    assert "--size" in stderr


def test_command_defaults_are_the_api_defaults() -> None:
    import click

    context = click.Context(main)
    command = main.get_command(context, "report")
    assert command is not None
    defaults = {param.name: param.get_default(context) for param in command.params}
    options = ReportOptions(sources=())
    for name in ("latency", "batch", "runs", "warmup", "per_stage"):
        assert defaults[name] == getattr(options, name), name
    assert defaults["size"] == options.size
    # No default: the API reads torch's current thread count when it runs.
    assert not isinstance(defaults["threads"], int) and options.threads is None


def test_complexity_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Complexity(params=1, macs=2).params = 3  # type: ignore[misc]

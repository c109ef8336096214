"""`report` times models in interleaved rounds and says what it measured them on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mobileone_cli import report as report_module
from mobileone_cli.cli import main
from mobileone_cli.report import ReportOptions, cpu_model, report_sources, time_interleaved


def test_rounds_run_every_model_once_each_starting_one_further_along() -> None:
    calls: list[str] = []
    runners = [lambda name=name: calls.append(name) for name in "abc"]
    seconds = time_interleaved(runners, runs=3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert [len(timed) for timed in seconds] == [3, 3, 3]


def test_a_slow_moment_lands_on_every_model_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: the machine is busy (+1 s per call) during the second round only."""
    now = [0.0]
    round_of_call = iter([0, 0, 1, 1, 2, 2])

    def runner() -> None:
        now[0] += 0.010 + (1.0 if next(round_of_call) == 1 else 0.0)

    monkeypatch.setattr(report_module.time, "perf_counter", lambda: now[0])
    first, second = time_interleaved([runner, runner], runs=3, warmup=0)
    # In blocks of runs, the busy moment would have hit one model three times; here each once.
    assert sorted(first) == pytest.approx([0.01, 0.01, 1.01])
    assert sorted(second) == pytest.approx([0.01, 0.01, 1.01])


def test_every_model_of_every_source_is_timed_in_the_same_rounds(
        s0_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts: list[int] = []
    real = report_module.time_interleaved

    def spy(runners: list, **settings: int) -> list[list[float]]:
        counts.append(len(runners))
        return real(runners, **settings)

    monkeypatch.setattr(report_module, "time_interleaved", spy)
    report = report_sources(ReportOptions(sources=(s0_checkpoint, s0_checkpoint), size=(32, 32),
                                          threads=1, runs=2, warmup=0))
    assert counts == [4]  # train and fused of both sources, one set of rounds
    for row in report.rows:
        assert [(item.model, item.runs) for item in row.latency] == [("train", 2), ("fused", 2)]


def test_versions_and_cpu_in_the_json_and_the_table_footer(s0_checkpoint: Path) -> None:
    arguments = [str(s0_checkpoint), "--size", "32", "32", "--runs", "1", "--warmup", "0",
                 "--threads", "1"]
    result = CliRunner().invoke(main, ["report", *arguments, "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert {"python", "torch", "onnxruntime", "numpy"} <= set(payload["versions"])
    assert payload["cpu_model"] and payload["threads"] == 1
    table = CliRunner().invoke(main, ["report", *arguments]).stdout
    footer = table.strip().splitlines()[-1]
    assert f"torch {payload['versions']['torch']}" in footer and payload["cpu_model"] in footer


def test_nothing_timed_states_no_thread_count(s0_checkpoint: Path) -> None:
    arguments = ["report", str(s0_checkpoint), "--size", "32", "32", "--no-latency"]
    result = CliRunner().invoke(main, [*arguments, "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["threads"] is None and payload["latency_measured"] is False
    assert "thread" not in CliRunner().invoke(main, arguments).stdout


def test_cpu_model_reads_proc_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                       "model name\t: AMD EPYC   7B13 64-Core Processor\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model(tmp_path / "absent")  # falls back on the platform module

"""Release bundles: manifest, summary, gates, checking a bundle later, and interruption."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mobileone_cli.cli import main
from mobileone_cli.files import sha256_path

# safetensors + ONNX keep these tests fast; test_export_coreml covers the Core ML package.
FAST = ["--to", "all"]


def run(*args: str | Path, cwd: Path | None = None) -> tuple[int, str, str]:
    previous = Path.cwd()
    try:
        if cwd:
            os.chdir(cwd)
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(previous)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def mobileone(*args: str | Path, cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mobileone_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def bundle(s0_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle")
    code, stdout, stderr = run("export", s0_checkpoint, *FAST, "-o", folder / "dist", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["written"] and report["passed"]
    return folder / "dist"


def test_bundle_holds_every_artifact_a_manifest_and_a_summary(bundle: Path) -> None:
    names = sorted(path.name for path in bundle.iterdir())
    assert names == ["manifest.json", "mobileone_s0.mlpackage", "mobileone_s0.onnx",
                     "mobileone_s0.ort", "mobileone_s0.pte",
                     "mobileone_s0.required_operators.config", "mobileone_s0.safetensors",
                     "mobileone_s0.tflite", "summary.md"]
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]


def test_manifest_records_what_a_pipeline_needs(bundle: Path, s0_checkpoint: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["name"] == s0_checkpoint.name
    assert manifest["model"]["variant"] == "s0"
    assert manifest["model"]["params"]["fused"] == 2_078_504
    assert manifest["model"]["macs"]["fused"] == 275_110_400  # the paper's 275 M
    assert manifest["input"]["channel_order"] == "RGB"
    assert manifest["input"]["mean"] == [0.485, 0.456, 0.406]
    assert set(manifest["versions"]) >= {"mobileone", "torch", "onnx", "onnxruntime", "onnxsim",
                                         "coremltools"}
    assert manifest["tool"]["command"][:2] == ["mobileone", "export"]
    for artifact in manifest["artifacts"]:
        assert not Path(artifact["path"]).is_absolute()
        assert artifact["verification"]["passed"] is True
        assert artifact["verification"]["max_rel_diff"] <= artifact["verification"]["rtol"]
    text = (bundle / "manifest.json").read_text()
    assert str(bundle.parent) not in text and socket.gethostname() not in text


def test_summary_is_a_markdown_table(bundle: Path) -> None:
    summary = (bundle / "summary.md").read_text()
    assert summary.startswith("## MobileOne S0 release bundle")
    assert "| mobileone_s0.onnx | onnx |" in summary and "❌" not in summary


def test_same_checkpoint_gives_byte_identical_bundle(s0_checkpoint: Path, tmp_path: Path) -> None:
    digests = []
    for run_index in range(2):
        cwd = tmp_path / f"run{run_index}"
        cwd.mkdir()
        result = mobileone("export", s0_checkpoint, "--to", "all", "-o", "dist",
                           "--precision", "fp32", cwd=cwd)
        assert result.returncode == 0, result.stderr
        digests.append({name: sha256_path(cwd / "dist" / name)
                        for name in ("manifest.json", "summary.md", "mobileone_s0.onnx",
                                     "mobileone_s0.safetensors", "mobileone_s0.mlpackage")})
    assert digests[0] == digests[1]


def test_a_failed_gate_exits_3_names_the_gate_and_writes_nothing(s0_checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    code, stdout, stderr = run("export", s0_checkpoint, "--to", "onnx", "-o", tmp_path / "m.onnx",
                               "--max-params", "2M", "--max-size-mb", "100")
    assert code == 3
    assert ("error: --max-params failed: folded params is 2,078,504, over the limit 2,000,000 by "
            "78,504 (3.9%)") in stderr
    assert list(tmp_path.iterdir()) == []


def test_gates_that_hold_let_the_bundle_through(s0_checkpoint: Path, tmp_path: Path) -> None:
    code, stdout, _ = run("export", s0_checkpoint, "--to", "onnx", "-o", tmp_path / "m.onnx",
                          "--max-params", "2.1M", "--max-macs", "300M", "--max-size-mb", "9",
                          "--json")
    assert code == 0
    assert [gate["passed"] for gate in json.loads(stdout)["gates"]] == [True, True, True]


def test_verify_manifest_checks_hashes_and_numbers(bundle: Path, s0_checkpoint: Path) -> None:
    code, stdout, _ = run("verify", "--manifest", bundle / "manifest.json", "--against",
                          s0_checkpoint, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["passed"]
    # Six targets, each re-proven in its own runtime; seven files hashed (the ORT config too).
    assert len(report["verifications"]) == 6 and all(h["passed"] for h in report["hashes"])
    assert len(report["hashes"]) == 8  # and the source checkpoint's


def test_verify_manifest_catches_a_changed_artifact(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "dist"
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    onnx_file = copy / "mobileone_s0.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0x40
    onnx_file.write_bytes(bytes(data))
    code, stdout, stderr = run("verify", "--manifest", copy / "manifest.json", "--json")
    assert code == 3
    changed = [h for h in json.loads(stdout)["hashes"] if not h["passed"]]
    assert [h["path"] for h in changed] == ["mobileone_s0.onnx"]


def test_verify_needs_an_artifact_or_a_manifest() -> None:
    code, _, stderr = run("verify")
    assert code == 2 and "give either ARTIFACT or --manifest" in stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_bundle_leaves_nothing_and_a_rerun_succeeds(
    s0_checkpoint: Path, tmp_path: Path, signum: int
) -> None:
    # Interrupt at several points: while loading, folding, exporting and writing.
    # 0.8 s lands in the imports, where CPython once turned a handled interrupt into exit -2.
    for delay in (0.8, 1.5, 3.0, 4.5, 6.0):
        process = subprocess.Popen(
            [sys.executable, "-m", "mobileone_cli", "export", str(s0_checkpoint), "--to", "all",
             "-o", "dist", "--precision", "fp32"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], (delay, leftovers)
        if process.returncode == 0:  # finished before the signal: then it is complete
            assert (tmp_path / "dist" / "manifest.json").exists()
            subprocess.run(["rm", "-r", str(tmp_path / "dist")], check=True)
        else:
            assert process.returncode == 130, (delay, stderr)
            assert "Traceback" not in stderr
            assert not (tmp_path / "dist").exists()
    rerun = mobileone("export", s0_checkpoint, "--to", "all", "-o", "dist", "--precision", "fp32",
                      cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr

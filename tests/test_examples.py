"""The CI example runs: built as a wheel, installed as the workflow installs it, every step run.

The workflow file is parsed (PyYAML), not copied: its install step installs the
wheel built from this checkout into a fresh virtual environment, and each later
step that runs a command runs as written, in order, with the workflow's own
environment, against the demo checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "release-models.yml"
# The distribution's name, as pyproject.toml declares it (tomllib is Python 3.11+).
NAME = re.search(r'^name = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)


def workflow() -> dict[str, Any]:
    import yaml  # the test extra's pyyaml

    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict[str, Any]]:
    [job] = workflow()["jobs"].values()
    return job["steps"]


def workflow_commands() -> list[str]:
    """The `mobileone ...` commands of the workflow's steps, in order."""
    return [step["run"] for step in steps() if str(step.get("run", "")).startswith("mobileone ")]


def test_the_workflow_has_the_steps_the_readme_promises() -> None:
    assert [c.split()[1] for c in workflow_commands()] == ["export", "verify"]
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in steps())
    assert "dist/summary.md" in WORKFLOW.read_text()


def test_the_workflow_installs_this_project_from_its_repository() -> None:
    from packaging.requirements import Requirement

    [install] = [step["run"] for step in steps() if "pip install" in str(step.get("run", ""))]
    assert install == 'pip install "$MOBILEONE"'
    source = workflow()["env"]["MOBILEONE"]
    requirement = Requirement(re.sub(r"\$\{\{.*?\}\}", "x", source))
    assert NAME is not None and requirement.name == NAME.group(1) and "all" in requirement.extras
    assert requirement.url is not None and requirement.url.startswith("git+")
    readme = (ROOT / "README.md").read_text()
    assert f'pip install "{NAME.group(1)}[all] @ git+' in readme


def build_wheel(folder: Path) -> Path:
    """The wheel of this checkout, built offline from a copy (no build/ in the checkout)."""
    source = folder / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "mobileone_cli", source / "mobileone_cli",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "-w", str(folder / "wheels"), str(source)],
                   check=True, capture_output=True)
    [wheel] = (folder / "wheels").glob("mobileone_cli-*.whl")
    return wheel


def fresh_environment(folder: Path) -> Path:
    """A new virtual environment; returns its bin folder."""
    venv.EnvBuilder(with_pip=True).create(folder)
    return folder / ("Scripts" if os.name == "nt" else "bin")


def share_dependencies(environment: Path, python: Path) -> None:
    """Let the environment import this interpreter's packages (torch & co.) after its own.

    A .pth line appends a folder to sys.path without processing the .pth files in
    it, so this checkout's editable install there stays invisible: `mobileone_cli`
    comes from the environment's own site-packages, the wheel.
    """
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site_packages) / "shared-dependencies.pth").write_text("\n".join(sorted(shared)) + "\n")


@pytest.mark.slow
def test_the_workflow_runs_from_a_built_wheel_in_a_fresh_environment(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "build")
    binaries = fresh_environment(tmp_path / "venv")
    python = binaries / "python"
    job_environment = {key: str(value) for key, value in workflow()["env"].items()}
    environment = {
        **os.environ, **job_environment,
        "MOBILEONE": str(wheel),  # the built wheel instead of the Git URL: no network here
        "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PATH": f"{binaries}{os.pathsep}{os.environ['PATH']}",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "step-summary.md"),
    }
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):  # nothing may reach this checkout's sources
        environment.pop(name, None)
    work = tmp_path / "work"
    work.mkdir()
    runnable = [step for step in steps() if "run" in step and "if" not in step]
    install, *others = runnable
    assert "pip install" in install["run"]

    def run_step(step: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        step_environment = {key: str(value) for key, value in step.get("env", {}).items()}
        return subprocess.run(["bash", "-e", "-c", step["run"]], cwd=work, text=True,
                              capture_output=True, env={**environment, **step_environment})

    result = run_step(install)
    assert result.returncode == 0, result.stderr
    share_dependencies(tmp_path / "venv", python)
    where = subprocess.run([str(python), "-c", "import mobileone_cli; print(mobileone_cli.__file__)"],
                           capture_output=True, text=True, env=environment, cwd=work)
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where
    # The checkpoint the workflow reads: the demo's, made by the installed console script.
    checkpoint = work / job_environment["CHECKPOINT"]
    made = subprocess.run([str(binaries / "mobileone"), "-q", "demo", "-o",
                           str(checkpoint.parent)], capture_output=True, text=True,
                          env=environment, cwd=work)
    assert made.returncode == 0 and checkpoint.exists(), made.stderr
    for step in others:
        result = run_step(step)
        assert result.returncode == 0, (step["run"], result.stderr)
    assert (work / "dist" / "summary.md").read_text().startswith("## MobileOne S0")
    assert (tmp_path / "step-summary.md").read_text() == (work / "dist" / "summary.md").read_text()


def test_documented_manifest_keys_are_the_written_ones(s0_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    import json

    readme = (WORKFLOW.parent.parent / "README.md").read_text()
    section = re.search(r"^### manifest\.json\n(.*?)(?=^##)", readme, re.DOTALL | re.MULTILINE)
    assert section, "README has no '### manifest.json' section"
    first_cells = re.findall(r"^\| (`.*?) \|", section.group(1), re.MULTILINE)
    documented = {key for cell in first_cells for key in re.findall(r"`([a-z0-9_.-]+)`", cell)}
    result = subprocess.run([sys.executable, "-m", "mobileone_cli", "export", str(s0_checkpoint),
                             "--to", "all", "-o", "dist", "--input-size", "64"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    # fold_verification holds the figures documented under "Verification" (test_docs checks them).
    written = set(manifest) | {f"{k}.{inner}" for k, v in manifest.items()
                               if isinstance(v, dict) and k != "fold_verification" for inner in v}
    assert documented == written

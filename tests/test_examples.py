"""The CI example runs: every `mobileone` command of the workflow file, as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

WORKFLOW = Path(__file__).resolve().parent.parent / "examples" / "release-models.yml"


def workflow_commands() -> list[str]:
    return re.findall(r"^\s+run: (mobileone .*)$", WORKFLOW.read_text(), re.MULTILINE)


def test_the_workflow_has_the_steps_the_readme_promises() -> None:
    text = WORKFLOW.read_text()
    assert [c.split()[1] for c in workflow_commands()] == ["export", "verify"]
    assert "pip install mobileone-cli" in text
    assert "actions/upload-artifact" in text and "dist/summary.md" in text


def test_the_workflow_commands_pass_on_a_real_checkpoint(s0_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    checkpoint_dir = tmp_path / "checkpoints"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "mobileone_s0_train.pth").symlink_to(s0_checkpoint)
    env_value = re.search(r"CHECKPOINT: (\S+)", WORKFLOW.read_text())
    assert env_value is not None
    for command in workflow_commands():
        arguments = [arg.replace("$CHECKPOINT", env_value.group(1))
                     for arg in shlex.split(command)][1:]
        result = subprocess.run([sys.executable, "-m", "mobileone_cli", *arguments],
                                cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr)
    assert (tmp_path / "dist" / "summary.md").read_text().startswith("## MobileOne S0")


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

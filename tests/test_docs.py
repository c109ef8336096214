"""The README's command reference is checked against the real CLI, so it cannot drift."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from mobileone_cli import errors
from mobileone_cli.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CHANGELOG = (Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()


def section(command: str) -> str:
    match = re.search(rf"^### mobileone {command}\n(.*?)(?=^##)", README, re.DOTALL | re.MULTILINE)
    assert match, f"README has no '### mobileone {command}' section"
    return match.group(1)


def documented_json_keys(command: str) -> set[str]:
    match = re.search(r"JSON keys[^:]*: (.*?)(?:\n\n|$)", section(command), re.DOTALL)
    assert match, f"the README section of {command} documents no JSON keys"
    return set(re.findall(r"`([a-z0-9_]+)`", match.group(1)))


def all_keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from all_keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from all_keys(inner)


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_and_option_is_documented(name: str) -> None:
    text = section(name)
    command = main.commands[name]
    assert command.help, f"{name} has no help text"
    for parameter in command.params:
        if isinstance(parameter, click.Option) and parameter.hidden:
            # The global options every command also takes after its name: documented once.
            assert parameter.opts in [option.opts for option in main.params], parameter.opts
            assert all(opt in command_reference_intro() for opt in parameter.opts)
        elif isinstance(parameter, click.Option):
            assert any(opt in text for opt in parameter.opts), f"{name}: {parameter.opts} undocumented"


def command_reference_intro() -> str:
    match = re.search(r"^## Command reference\n(.*?)(?=^###)", README, re.DOTALL | re.MULTILINE)
    assert match, "README has no '## Command reference' section"
    return match.group(1)


def _json_of(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_documented_json_keys_are_the_emitted_ones(s0_checkpoint: Path, tmp_path: Path) -> None:
    onnx_file = str(tmp_path / "s0.onnx")
    emitted = {
        "inspect": _json_of("inspect", str(s0_checkpoint), "--json"),
        "fold": _json_of("fold", str(s0_checkpoint), "-o", str(tmp_path / "s0.safetensors"),
                         "--input-size", "64", "--json"),
        "export": _json_of("export", str(s0_checkpoint), "--to", "onnx", "-o", onnx_file,
                           "--input-size", "64", "--max-params", "3M", "--json"),
        "verify": _json_of("verify", onnx_file, "--against", str(s0_checkpoint), "--json"),
        "report": _json_of("report", str(s0_checkpoint), onnx_file, "--size", "64", "64",
                           "--runs", "1", "--warmup", "0", "--json"),
    }
    for command, payload in emitted.items():
        documented = documented_json_keys(command)
        if "every key of `inspect`" in " ".join(section(command).split()):
            documented = (documented - {"inspect"}) | documented_json_keys("inspect")
        assert set(payload) <= documented, (command, set(payload) - documented)
        assert documented <= set(all_keys(payload)), (command, documented - set(all_keys(payload)))


def test_exit_codes_table_matches_the_code() -> None:
    table = dict(re.findall(r"^\| (\d+) \| (\w+)", README, re.MULTILINE))
    codes = {errors.EXIT_OK: "success", errors.EXIT_BAD_INPUT: "bad",
             errors.EXIT_USAGE: "usage", errors.EXIT_VERIFICATION_FAILED: "verification",
             errors.EXIT_EXPORT_FAILED: "export", 130: "interrupted"}
    assert {int(code): word for code, word in table.items()} == codes


def test_changelog_has_an_unreleased_section() -> None:
    assert "## [Unreleased]" in CHANGELOG


def exit_codes_section() -> str:
    match = re.search(r"^## Exit codes\n(.*?)(?=^## )", README, re.DOTALL | re.MULTILINE)
    assert match, "README has no '## Exit codes' section"
    return match.group(1)


def test_documented_error_object_is_the_emitted_one(tmp_path: Path) -> None:
    """The README's `{"error": {...}}` keys, and its promise of one JSON object on stdout."""
    documented = re.search(r'`(\{"error": \{.*?\}\})`', " ".join(exit_codes_section().split()))
    assert documented, "the Exit codes section does not show the error object"
    keys = set(re.findall(r'"([a-z]+)":', documented.group(1)))
    for arguments, code in ((["fold", "--json"], errors.EXIT_USAGE),
                            (["inspect", str(tmp_path), "--json"], errors.EXIT_USAGE),
                            (["inspect", "--jsn", "x"], errors.EXIT_USAGE)):
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == code
        if "--json" in arguments:
            payload = json.loads(result.stdout)
            assert set(payload) == {"error"} and set(payload["error"]) | {"error"} == keys
            assert payload["error"]["code"] == code
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and all(
            line.startswith(("error: ", "hint: ")) for line in lines), result.stderr


def test_documented_usage_exit_code_covers_clicks_errors() -> None:
    row = re.search(r"^\| 2 \| (.*) \|$", README, re.MULTILINE)
    assert row, "no exit code 2 row"
    for case in ("unknown option", "missing argument", "bad choice", "does not exist"):
        assert case in row.group(1), case

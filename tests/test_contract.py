"""The error contract a pipeline and a person read: one error style, JSON on every failure.

Every failure, click's own usage errors included, is `error: ...` plus an optional
`hint: ...` on stderr and the documented exit code; with `--json` stdout holds
exactly one JSON object, `{"error": {"code", "message", "hint"}}` (plus the result's
own keys when the run got as far as a result).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from mobileone_cli.cli import EXAMPLES, _click_hint, main
from mobileone_cli.proof.inputs import IMAGE_SUFFIXES
from tests.faults import ignore_eps


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_our_style(stderr: str, fragment: str) -> list[str]:
    """Only `error:` / `hint:` lines, the first naming `fragment`; returns the lines."""
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: ") and fragment in lines[0], stderr
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), stderr
    assert "Usage:" not in stderr and "Try " not in stderr and "Traceback" not in stderr
    return lines


def the_one_json_object(stdout: str) -> dict[str, Any]:
    payload = json.loads(stdout)  # raises on anything but exactly one JSON document
    assert isinstance(payload, dict)
    return payload


# Each click usage error: arguments, the fragment of the error line, and the hint's fragment.
USAGE_ERRORS = {
    "missing argument": (["fold"], "missing argument 'CHECKPOINT'", "fold --help"),
    "bad choice": (["export", "{ckpt}", "--to", "tensorrt"], "'tensorrt' is not one of",
                   "export --help"),
    "no such option": (["inspect", "{ckpt}", "--jsn"], "no such option '--jsn'",
                       "did you mean '--json'?"),
    "no such command": (["foldd"], "no such command 'foldd'", "did you mean 'fold'?"),
    "missing file": (["inspect", "absent.pth"], "'absent.pth' does not exist", "--help"),
    "refused target": (["export", "{ckpt}", "--to", "coreml", "--target", "iOS14"],
                       "--target iOS14 is too old for an ML Program", "iOS15"),
    "our own usage error": (["verify"], "give either ARTIFACT or --manifest", "verify --help"),
}


@pytest.mark.parametrize("name", USAGE_ERRORS)
def test_usage_errors_are_one_error_and_one_hint_exit_2(name: str, s0_checkpoint: Path) -> None:
    arguments, fragment, hint = USAGE_ERRORS[name]
    code, stdout, stderr = invoke(*(a.format(ckpt=s0_checkpoint) for a in arguments))
    assert code == 2 and stdout == ""
    lines = assert_our_style(stderr, fragment)
    assert len(lines) == 2 and hint in lines[1], stderr


@pytest.mark.parametrize("name", USAGE_ERRORS)
def test_usage_errors_with_json_print_one_error_object(name: str, s0_checkpoint: Path) -> None:
    arguments, fragment, hint = USAGE_ERRORS[name]
    code, stdout, stderr = invoke(*(a.format(ckpt=s0_checkpoint) for a in arguments), "--json")
    payload = the_one_json_object(stdout)
    assert code == 2 and set(payload) == {"error"}
    assert payload["error"]["code"] == 2
    assert fragment in payload["error"]["message"] and hint in payload["error"]["hint"]
    assert_our_style(stderr, fragment)


def test_a_bad_checkpoint_with_json_prints_one_error_object(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.pth"
    checkpoint.write_bytes(b"hello world, no tensors")
    code, stdout, stderr = invoke("inspect", checkpoint, "--json")
    payload = the_one_json_object(stdout)
    assert code == 1 and payload["error"]["code"] == 1
    assert "ckpt.pth" in payload["error"]["message"] and payload["error"]["hint"]
    assert_our_style(stderr, "ckpt.pth")


def test_a_failed_verification_with_json_carries_its_figures_and_the_error(
        s0_checkpoint: Path, tmp_path: Path) -> None:
    with ignore_eps():
        code, stdout, stderr = invoke("fold", s0_checkpoint, "-o", tmp_path / "s0.safetensors",
                                      "--input-size", "64", "--json")
    payload = the_one_json_object(stdout)
    assert code == 3 and payload["fold_verification"]["passed"] is False
    assert payload["error"]["code"] == 3
    assert "beyond the tolerance" in payload["error"]["message"]
    assert_our_style(stderr, "beyond the tolerance")


def test_choices_are_case_insensitive() -> None:
    export = main.commands["export"]
    converted = {parameter.name: parameter.type.convert(value, parameter, None)
                 for parameter in export.params
                 for name, value in (("target", "CoreML"), ("precision", "FP32"),
                                     ("layout", "TIMM"), ("dtype", "Float16"),
                                     ("coreml_target", "ios17"))
                 if parameter.name == name}
    assert converted == {"target": "coreml", "precision": "fp32", "layout": "timm",
                         "dtype": "float16", "coreml_target": "iOS17"}


def test_a_case_insensitive_choice_runs(s0_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "s0.safetensors"
    code, stdout, stderr = invoke("fold", s0_checkpoint, "-o", out, "--layout", "TIMM",
                                  "--input-size", "64", "--json")
    assert code == 0, stderr
    [artifact] = the_one_json_object(stdout)["artifacts"]
    assert artifact["declared"]["details"]["layout"] == "timm"


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_works_before_or_after_the_command(s0_checkpoint: Path, where: str) -> None:
    arguments = ["inspect", str(s0_checkpoint)]
    arguments = ["-q", *arguments] if where == "before" else [*arguments, "-q"]
    assert invoke(*arguments) == (0, "", "")


def test_debug_after_the_command_shows_the_traceback(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt.pth"
    checkpoint.write_bytes(b"hello world, no tensors")
    code, _, stderr = invoke("inspect", checkpoint, "--debug")
    assert code == 1 and "Traceback" in stderr and "error: " in stderr


def test_no_arguments_shows_the_help() -> None:
    code, stdout, stderr = invoke()
    assert "Commands:" in stdout + stderr and "error:" not in stderr


# -- help and guidance -------------------------------------------------------------------


# What `mobileone demo` and the examples before each one write, for parsing them.
EXAMPLE_FILES = ("mobileone-demo/mobileone_s0_train.pth", "s0.onnx", "dist/manifest.json")


def parses(name: str, arguments: list[str]) -> bool:
    """Whether click takes `arguments` for command `name`: every option, value and file."""
    with main.commands[name].make_context(name, arguments) as ctx:
        return ctx.params is not None


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_help_ends_with_two_or_three_examples_that_parse(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = invoke(name, "--help")[1]
    assert 2 <= len(EXAMPLES[name]) <= 3
    assert help_text.rstrip().splitlines()[-len(EXAMPLES[name]):] == [
        f"    $ {example}" for example in EXAMPLES[name]]
    monkeypatch.chdir(tmp_path)
    for file in EXAMPLE_FILES:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).touch()
    for example in EXAMPLES[name]:
        program, command, *arguments = shlex.split(example)
        assert (program, command) == ("mobileone", name)
        assert parses(name, arguments), example


def test_target_help_offers_only_the_targets_it_accepts() -> None:
    help_text = " ".join(invoke("export", "--help")[1].split())
    assert "iOS15" in help_text and "iOS13" not in help_text and "iOS14" not in help_text
    assert invoke("export", "x", "--to", "coreml", "--target", "iOS13")[0] == 2


def test_inputs_help_names_every_image_suffix_read() -> None:
    for command in ("fold", "export", "verify"):
        help_text = " ".join(invoke(command, "--help")[1].split())
        for suffix in IMAGE_SUFFIXES:
            assert suffix.lstrip(".") in help_text, (command, suffix)


def test_demo_ends_with_three_commands_to_try_on_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "demo folder"
    code, stdout, stderr = invoke("demo", "-o", folder)
    assert code == 0, stderr
    steps = stderr.strip().splitlines()[-4:]
    assert steps[0] == "next, try:"
    commands = [shlex.split(line.removeprefix("  $ ")) for line in steps[1:]]
    assert [command[1] for command in commands] == ["export", "verify", "report"]
    assert str(folder / "mobileone_s0_train.pth") in commands[0]
    assert str(folder / "mobileone_s0.safetensors") in commands[2]
    (folder / "dist").mkdir()
    (folder / "dist" / "manifest.json").touch()  # what the first command writes
    for program, name, *arguments in commands:
        assert program == "mobileone" and parses(name, arguments)
    as_json = invoke("demo", "-o", tmp_path / "again", "--json")
    assert "next, try" not in as_json[1] + as_json[2]


def test_a_git_lfs_pointer_says_to_pull_it(tmp_path: Path) -> None:
    pointer = tmp_path / "mobileone_s0.pth"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n"
                       "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                       "size 21913789\n")
    code, _, stderr = invoke("inspect", pointer)
    assert code == 1
    lines = assert_our_style(stderr, "is a Git LFS pointer")
    assert lines[1] == "hint: run `git lfs pull` to fetch the file"


def test_a_parse_time_check_keeps_the_hint_it_carries() -> None:
    """A parameter type that turns a MobileOneError into click's error can keep its hint."""
    error = click.BadParameter("--input-size 100000 needs 120 GB", param_hint="'--input-size'")
    error.hint = "pass --input-size 1024 or less"  # type: ignore[attr-defined]
    assert _click_hint(error, None) == "pass --input-size 1024 or less"
    assert _click_hint(click.UsageError("x"), ["--json"]) == "did you mean '--json'?"

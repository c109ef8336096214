"""Issue 9: nothing lost, nothing trusted that should not be, through the real CLI.

One test per situation. Each asserts the exit code, that stderr holds one `error:` line (and
at most a `hint:` line; click's own usage errors, exit 2, hold one `Error:` line after the
usage), and that nothing outside the destination changed: the whole temporary tree is
snapshotted before and compared after.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

from fixtures.bundles import write_bundle
from mobileone_cli import files
from mobileone_cli.cli import main
from mobileone_cli.synthetic import make_checkpoint
from mobileone_cli.validation import COREML_TARGETS, reference_bytes
from tests.test_robustness import tiny_spec

SIZE = ["--input-size", "64"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its bytes (a link: its target)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_symlink():
            state[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir"
    return state


def run(*args: Any) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"a traceback: {result.exception!r}") from result.exception
    return result.exit_code, result.stdout, result.stderr


def one_error(stderr: str) -> str:
    lines = stderr.splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) <= 2 and all(line.startswith(("error: ", "hint: ")) for line in lines), stderr
    return lines[0].removeprefix("error: ")


def usage_error(stderr: str) -> str:
    """A parse-time refusal: the same one `error:` line (and `hint:`) as any other."""
    return one_error(stderr)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    return make_checkpoint(folder / "tiny.pth", spec=tiny_spec(num_classes=5))


@pytest.fixture
def work(tmp_path: Path, checkpoint: Path) -> Iterator[Path]:
    """A folder holding a copy of the checkpoint; the test's whole world."""
    shutil.copy(checkpoint, tmp_path / "ckpt.pth")
    yield tmp_path


def refused(work: Path, *args: Any, code: int = 1) -> str:
    before = snapshot(work)
    exit_code, stdout, stderr = run(*args)
    assert exit_code == code, stderr
    assert stdout == ""
    assert snapshot(work) == before, "a refused run changed files"
    return one_error(stderr) if code != 2 else usage_error(stderr)


# -- destinations ------------------------------------------------------------------------------
def test_fold_onto_its_own_checkpoint_is_refused(work: Path) -> None:
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "ckpt.pth", "--force", *SIZE)
    assert message == f"-o {work / 'ckpt.pth'} is the input {work / 'ckpt.pth'}; writing it " \
                      "would replace it"


def test_a_file_never_replaces_a_folder(work: Path) -> None:
    (work / "keep").mkdir()
    (work / "keep" / "notes.txt").write_text("mine")
    message = refused(work, "export", work / "ckpt.pth", "--to", "onnx", "-o", work / "keep",
                      "--force", *SIZE)
    assert message == f"{work / 'keep'} is a folder; a file output never replaces a folder"


def test_a_bundle_never_replaces_a_folder_that_is_not_one(work: Path) -> None:
    (work / "dist").mkdir()
    (work / "dist" / "notes.txt").write_text("mine")
    message = refused(work, "export", work / "ckpt.pth", "--to", "all", "-o", work / "dist",
                      "--force", *SIZE)
    assert message.startswith(f"{work / 'dist'} is a folder but not a mobileone bundle")


def test_force_never_deletes_a_users_file_in_a_bundle(work: Path) -> None:
    write_bundle(work / "dist", {"m.onnx": b"x"})
    (work / "dist" / "release-notes.md").write_text("mine")
    message = refused(work, "export", work / "ckpt.pth", "--to", "all", "-o", work / "dist",
                      "--force", *SIZE)
    assert message == (f"bundle {work / 'dist'} also holds files mobileone did not write "
                       "(release-notes.md); --force replaces only a bundle's own files")


def test_an_output_holding_an_input_is_refused(work: Path) -> None:
    (work / "images").mkdir()
    message = refused(work, "export", work / "ckpt.pth", "--to", "all", "-o", work,
                      "--force", *SIZE)
    assert message == (f"-o {work} holds the input {work / 'ckpt.pth'}; replacing it would "
                       "delete it")
    labels = work / "labels.txt"
    labels.write_text("\n".join("abcde"))
    message = refused(work, "export", work / "ckpt.pth", "--to", "onnx", "-o", labels, "--force",
                      "--labels", labels, *SIZE)
    assert message == f"-o {labels} is the input {labels}; writing it would replace it"


@pytest.mark.parametrize(("output", "expected"), [
    (".", "-o . names an existing folder, not a new output"),
    ("-", "-o - would write a file named '-'; mobileone writes files, not standard output"),
])
def test_dot_and_dash_are_refused(work: Path, output: str, expected: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    assert refused(work, "export", "ckpt.pth", "--to", "onnx", "-o", output, "--force",
                   *SIZE) == expected


def test_a_symlink_to_a_folder_is_refused_even_with_force(work: Path) -> None:
    (work / "real").mkdir()
    (work / "link.onnx").symlink_to(work / "real")
    message = refused(work, "export", work / "ckpt.pth", "--to", "onnx", "-o",
                      work / "link.onnx", "--force", *SIZE)
    assert message.startswith(f"{work / 'link.onnx'} is a symbolic link to a folder")


def test_a_name_too_long_once_staged_is_refused_before_work(work: Path) -> None:
    name = "m" * (255 - len(".") - len(".XXXXXXXX.partial") + 1 - len(".safetensors")) \
        + ".safetensors"
    assert len(name) <= 255  # the name itself is valid; staging it is not
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / name, *SIZE)
    assert "is too long: with the staging suffix it takes 256 bytes" in message


def test_a_read_only_destination_is_refused_before_work(work: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, whom permissions do not stop: simulate what access() answers.
    monkeypatch.setattr(files.os, "access", lambda path, mode: Path(path) != work / "out")
    (work / "out").mkdir()
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "out" / "f.safetensors",
                      *SIZE)
    assert message == f"output folder {work / 'out'} is not writable"


def test_too_little_free_space_is_refused_before_work(work: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage)
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "f.safetensors", *SIZE)
    assert message.startswith(f"{work} has 0.0 MB free; the output needs about")


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    def full_in_rust(*args: object, **kwargs: object) -> None:
        # How safetensors (Rust) reports it: its own exception type, the errno in the text
        # (measured under `ulimit -f`: "I/O error: File too large (os error 27)").
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr("safetensors.torch.save_file", full_in_rust)
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "f.safetensors", *SIZE)
    assert message == f"cannot write {work / 'f.safetensors'}: the disk is full; nothing was written"


def test_force_replaces_an_existing_file_of_the_same_kind(work: Path) -> None:
    output = work / "f.safetensors"
    output.write_bytes(b"old")
    code, _, stderr = run("fold", work / "ckpt.pth", "-o", output, "--force", *SIZE)
    assert code == 0, stderr
    assert output.read_bytes()[:8] != b"old" and output.stat().st_size > 1000
    assert sorted(path.name for path in work.iterdir()) == ["ckpt.pth", "f.safetensors"]


# -- options, checked at parse time (exit 2) -----------------------------------------------------
@pytest.mark.parametrize("option", [
    ["--rtol", "nan"], ["--rtol", "inf"], ["--max-size-mb", "nan"], ["--max-size-mb", "inf"],
    ["--max-params", "nan"], ["--max-macs", "inf"],
])
def test_nan_and_infinity_are_refused(work: Path, option: list[str]) -> None:
    message = refused(work, "export", work / "ckpt.pth", "--to", "onnx", "-o", work / "m.onnx",
                      *option, code=2)
    assert "not a finite number" in message


def test_an_input_size_no_memory_can_hold_is_refused(work: Path) -> None:
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "f.safetensors",
                      "--input-size", "100000", code=2)
    assert f"needs at least {reference_bytes(100000) / 1e9:,.1f} GB for the reference run" \
        in message


@pytest.mark.parametrize(("target", "expected"), [
    ("iOS1", "--target 'iOS1' is not a Core ML deployment target"),
    ("iOS14", "--target iOS14 is too old for an ML Program"),
])
def test_a_bad_target_is_refused_before_the_fold(work: Path, target: str, expected: str) -> None:
    assert expected in refused(work, "export", work / "ckpt.pth", "--to", "coreml", "--target",
                               target, "-o", work / "m.mlpackage", code=2)


def test_every_listed_target_is_a_coremltools_target() -> None:
    import coremltools as ct

    names = set(ct.target.__members__)
    assert set(COREML_TARGETS) <= names
    minimum = ct.target.iOS15
    assert {name for name in names if ct.target[name] >= minimum} == set(COREML_TARGETS)


@pytest.mark.parametrize(("content", "expected"), [
    (b"cat\n" * 1000, "repeats 'cat' 1000 times"),
    (b"caf\xe9\n", "is not UTF-8 (byte 3 is 0xe9)"),
    (b"\n\n", "holds no labels"),
])
def test_bad_labels_are_refused_at_parse_time(work: Path, content: bytes, expected: str) -> None:
    labels = work / "labels.txt"
    labels.write_bytes(content)
    assert expected in refused(work, "export", work / "ckpt.pth", "--to", "coreml", "--labels",
                               labels, "-o", work / "m.mlpackage", code=2)


def test_a_label_count_that_does_not_match_is_refused_before_the_fold(work: Path) -> None:
    labels = work / "labels.txt"
    labels.write_text("a\nb\n")
    assert refused(work, "export", work / "ckpt.pth", "--to", "coreml", "--labels", labels,
                   "-o", work / "m.mlpackage", *SIZE) == \
        "labels file has 2 labels, the model has 5 classes"


# -- messages ----------------------------------------------------------------------------------
def test_float16_overflow_fails_verification_naming_the_tensor(work: Path) -> None:
    state = torch.load(work / "ckpt.pth")
    state["linear.weight"] = state["linear.weight"] * 0 + 1e5
    torch.save(state, work / "ckpt.pth")
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "f.safetensors",
                      "--dtype", "float16", *SIZE, code=3)
    assert message == ("'linear.weight' holds 100000, beyond float16's range of ±65504; a "
                       "float16 file would hold infinities; nothing was written")


def test_a_fold_overflowing_float32_is_bad_input_not_a_fold_bug(work: Path) -> None:
    state = torch.load(work / "ckpt.pth")
    key = next(key for key in state if key.endswith("rbr_conv.0.conv.weight"))
    bn = key.replace("conv.weight", "bn.")
    state[key] = state[key] * 0 + 1e36
    state[bn + "weight"] = state[bn + "weight"] * 0 + 1e3
    state[bn + "running_var"] = state[bn + "running_var"] * 0
    torch.save(state, work / "ckpt.pth")
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "f.safetensors", *SIZE)
    assert message.startswith("folding gives '") and "beyond float32's range" in message


def test_a_decompression_bomb_image_is_one_line(work: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    (work / "images").mkdir()
    Image.new("RGB", (100, 100)).save(work / "images" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is then over twice the limit
    message = refused(work, "fold", work / "ckpt.pth", "-o", work / "f.safetensors",
                      "--inputs", work / "images", *SIZE)
    assert message.startswith("cannot read image bomb.png: Image size (10000 pixels) exceeds")


def test_verify_on_a_garbage_onnx_file_is_one_line(work: Path) -> None:
    (work / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    message = refused(work, "verify", work / "model.onnx", "--against", work / "ckpt.pth")
    assert message.startswith(f"{work / 'model.onnx'} is not an ONNX model")


def test_verify_never_reads_external_data_outside_the_models_folder(work: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              initializer=[weight])
    (work / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx.load(str(work / "model.onnx"), load_external_data=False).graph.initializer
    message = refused(work, "verify", work / "model.onnx", "--against", work / "ckpt.pth")
    assert message == (f"{work / 'model.onnx'}: external data of 'w' is at "
                       "'../../../../etc/passwd', outside the model's folder; it is not read")


def test_force_replaces_a_bundle_it_wrote_and_leaves_nothing_else(work: Path) -> None:
    dist = work / "dist"
    arguments = ["export", work / "ckpt.pth", "--to", "all", "-o", dist, *SIZE]
    code, _, stderr = run(*arguments)
    assert code == 0, stderr
    first = snapshot(dist)
    (dist / "summary.md").write_text("edited by hand")  # a file the tool wrote: replaced
    code, _, stderr = run(*arguments, "--force")
    assert code == 0, stderr
    second = snapshot(dist)
    assert second.pop("manifest.json") != first.pop("manifest.json")  # records --force
    assert second == first
    assert sorted(path.name for path in work.iterdir()) == ["ckpt.pth", "dist"]
    code, _, stderr = run("verify", "--manifest", dist / "manifest.json")
    assert code == 0, stderr

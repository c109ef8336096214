"""manifest.py and `verify --manifest`: a manifest is untrusted input.

Each hostile or broken manifest is refused in one line with the documented exit code
(1: not a valid manifest; 3: the bundle does not hold what it lists), and nothing it names
outside the bundle is opened or reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fixtures.bundles import manifest_for, write_bundle
from mobileone_cli.cli import main
from mobileone_cli.manifest import (
    BundleContentError,
    ManifestError,
    check_bundle_files,
    check_relative,
    read_manifest,
    validate,
)


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every path under `folder` with its bytes (a link: its target)."""
    state: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        state[relative] = (f"-> {os.readlink(path)}" if path.is_symlink()
                           else path.read_bytes() if path.is_file() else "dir")
    return state


def verify(manifest: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["verify", "--manifest", str(manifest), *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def one_line_error(stderr: str) -> str:
    lines = stderr.splitlines()
    assert [line for line in lines if line.startswith("error: ")] == [lines[0]], stderr
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), stderr
    assert "Traceback" not in stderr
    return lines[0].removeprefix("error: ")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "dist", {"model.onnx": b"onnx bytes",
                                            "model.safetensors": b"weights"})


def rewrite(manifest: Path, change: Any) -> Path:
    data = json.loads(manifest.read_text())
    change(data)
    manifest.write_text(json.dumps(data))
    return manifest


def test_a_valid_bundle_passes(bundle: Path) -> None:
    code, stdout, stderr = verify(bundle, "--json")
    assert code == 0, stderr
    assert [entry["passed"] for entry in json.loads(stdout)["hashes"]] == [True, True]


@pytest.mark.parametrize("entry", [
    "../../../../etc/passwd", "/etc/passwd", "/dev/zero", "a/../../outside", "./model.onnx",
    "a//b", "..", "C:\\Windows\\win.ini", "dir\\..\\..\\x", "", "~/secret", "manifest.json",
])
def test_a_path_that_could_leave_the_bundle_is_refused_unopened(bundle: Path, tmp_path: Path,
                                                                entry: str) -> None:
    rewrite(bundle, lambda data: data["artifacts"][0].update(path=entry))
    before = snapshot(tmp_path)
    code, stdout, stderr = verify(bundle, "--json")
    assert code == 1 and json.loads(stdout)["error"]["code"] == 1  # the one JSON object
    message = one_line_error(stderr)
    assert "artifacts[0].path" in message and "relative and inside the bundle" in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("change", "message"), [
    (lambda data: data.update(artifacts=[]), "artifacts has 0 entries, at least 1 expected"),
    (lambda data: data.pop("source"), "the manifest has no key source"),
    (lambda data: data["artifacts"][1].pop("sha256"),
     "the manifest has no key artifacts[1].sha256"),
    (lambda data: data["artifacts"][0].update(sha256=5),
     "artifacts[0].sha256 must be a 64-digit lowercase hex sha256, not 5"),
    (lambda data: data["artifacts"][0].update(path=["x"]),
     'artifacts[0].path must be a str, not ["x"]'),
    (lambda data: data["input"].update(shape="224"), 'input.shape must be a list, not "224"'),
    (lambda data: data["artifacts"][0].update(format="tflite"),
     'artifacts[0].format must be one of safetensors, onnx, coreml, not "tflite"'),
    (lambda data: data["artifacts"].append(dict(data["artifacts"][0])),
     "artifacts list model.onnx more than once"),
])
def test_a_missing_or_mistyped_key_is_one_line(bundle: Path, change: Any, message: str) -> None:
    rewrite(bundle, change)
    code, stdout, stderr = verify(bundle)
    assert code == 1
    assert one_line_error(stderr) == message


def test_a_file_the_manifest_does_not_list_fails_the_bundle(bundle: Path) -> None:
    (bundle.parent / "extra.onnx").write_bytes(b"smuggled")
    code, _, stderr = verify(bundle)
    assert code == 3
    assert one_line_error(stderr) == (f"the bundle at {bundle.parent} holds files its manifest "
                                      "does not list: extra.onnx")


def test_a_symbolic_link_is_not_followed(bundle: Path, tmp_path: Path) -> None:
    target = bundle.parent / "model.onnx"
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    code, _, stderr = verify(bundle, "--json")
    assert code == 3
    assert one_line_error(stderr) == f"{target} is a symbolic link; a bundle holds only regular files"


def test_a_package_holding_a_link_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dist"
    manifest = write_bundle(folder, {})
    package = folder / "model.mlpackage"
    (package / "Data").mkdir(parents=True)
    (package / "Data" / "weights.bin").symlink_to("/etc/passwd")
    rewrite(manifest, lambda data: data["artifacts"].append(
        {"path": "model.mlpackage", "format": "coreml", "bytes": 1, "sha256": "0" * 64,
         "verification": None}))
    with pytest.raises(BundleContentError, match=r"weights.bin is a symbolic link"):
        check_bundle_files(folder, read_manifest(manifest))


def test_a_fifo_is_never_opened(bundle: Path) -> None:
    fifo = bundle.parent / "model.onnx"
    fifo.unlink()
    os.mkfifo(fifo)
    code, _, stderr = verify(bundle)
    assert code == 3
    assert one_line_error(stderr) == f"{fifo} is not a regular file"


def test_the_manifest_itself_must_be_a_regular_bounded_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is not a regular file"):
        read_manifest(Path("/dev/zero"))
    garbage = tmp_path / "manifest.json"
    garbage.write_bytes(b"\xff\xfe not json")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(garbage)


def test_the_schema_is_data_a_new_field_is_one_entry() -> None:
    schema = {"artifacts": [], "signature": {"key": str}}
    validate({"signature": {"key": "k"}}, {"signature": {"key": str}}, where="")
    with pytest.raises(ManifestError, match=r"the manifest has no key signature.key"):
        validate({"signature": {}}, {"signature": schema["signature"]}, where="")


def test_a_relative_path_is_returned_normalised() -> None:
    assert str(check_relative("sub/model.onnx", where="x")) == "sub/model.onnx"


def test_manifest_for_matches_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_for([{"path": "a.onnx", "format": "onnx", "bytes": 1,
                                               "sha256": "0" * 64, "verification": None}])))
    assert read_manifest(path)["artifacts"][0]["path"] == "a.onnx"

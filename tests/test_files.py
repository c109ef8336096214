"""files.py: destinations checked before work, and outputs swapped into place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.bundles import write_bundle
from mobileone_cli import files
from mobileone_cli.errors import OutputError
from mobileone_cli.files import (
    check_destination,
    exchange_paths,
    replace_path,
    staging_name,
    staging_path,
)


def folder_with(path: Path, **contents: str) -> Path:
    path.mkdir()
    for name, text in contents.items():
        (path / name).write_text(text)
    return path


def test_staging_name_is_what_staging_path_uses(tmp_path: Path) -> None:
    with staging_path(tmp_path / "model.onnx") as staged:
        assert len(staged.parent.name) == len(staging_name("model.onnx"))
        assert staged.parent.name.startswith(".model.onnx.")
        assert staged.parent.name.endswith(".partial")
    assert list(tmp_path.iterdir()) == []


def test_exchange_swaps_two_folders_atomically(tmp_path: Path) -> None:
    first = folder_with(tmp_path / "first", a="1")
    second = folder_with(tmp_path / "second", b="2")
    if not exchange_paths(first, second):
        pytest.skip("no renameat2 RENAME_EXCHANGE on this platform or file system")
    assert [p.name for p in first.iterdir()] == ["b"]
    assert [p.name for p in second.iterdir()] == ["a"]


def test_replacing_a_folder_keeps_the_old_one_in_the_staging_folder(tmp_path: Path) -> None:
    old = folder_with(tmp_path / "dist", old="x")
    with staging_path(old) as staged:
        folder_with(staged, new="y")
        replace_path(staged, old)
        assert [p.name for p in old.iterdir()] == ["new"]
        # Until the staging folder goes, the old output is still there, not deleted.
        assert not staged.exists() or [p.name for p in staged.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]


def test_without_exchange_the_old_folder_is_renamed_aside_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "exchange_paths", lambda first, second: False)
    old = folder_with(tmp_path / "dist", old="x")
    new = folder_with(tmp_path / "new", new="y")
    replace_path(new, old)
    assert [p.name for p in old.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]


def test_a_failed_second_rename_says_where_the_old_folder_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "exchange_paths", lambda first, second: False)
    old = folder_with(tmp_path / "dist", old="x")
    new = folder_with(tmp_path / "new", new="y")
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self == new:
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OutputError) as caught:
        replace_path(new, old)
    aside = next(p for p in tmp_path.iterdir() if p.name.endswith(".old"))
    assert caught.value.message == (f"could not move the new output to {old} (Input/output "
                                    f"error); the old one is at {aside}")
    assert [p.name for p in aside.iterdir()] == ["old"]


def test_a_file_replaces_a_file_atomically(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    replace_path(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "new" and not (tmp_path / "a").exists()


@pytest.mark.parametrize(("kind", "make", "message"), [
    ("file", lambda p: p.mkdir(), "is a folder; a file output never replaces a folder"),
    ("package", lambda p: p.write_text("x"), "exists and is not a Core ML package"),
    ("package", lambda p: p.mkdir() or (p / "x").write_text("x"),
     "exists and is not a Core ML package"),
    ("bundle", lambda p: p.write_text("x"), "is a file; a bundle is a folder"),
    ("bundle", lambda p: folder_with(p, notes="x"), "is a folder but not a mobileone bundle"),
])
def test_no_force_replaces_an_output_of_another_kind(tmp_path: Path, kind: str, make: object,
                                                     message: str) -> None:
    path = tmp_path / "out"
    make(path)  # type: ignore[operator]
    for force in (False, True):
        with pytest.raises(OutputError, match=message):
            check_destination(path, kind=kind, force=force)


def test_a_bundle_replaces_an_empty_folder_or_its_own_files_only(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", kind="bundle", force=False)
    write_bundle(tmp_path / "dist", {"m.onnx": b"x"})
    with pytest.raises(OutputError, match="already exists"):
        check_destination(tmp_path / "dist", kind="bundle", force=False)
    check_destination(tmp_path / "dist", kind="bundle", force=True)
    (tmp_path / "dist" / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match=r"also holds files mobileone did not write \(mine.txt\)"):
        check_destination(tmp_path / "dist", kind="bundle", force=True)


def test_a_hard_link_to_an_input_is_the_input(tmp_path: Path) -> None:
    (tmp_path / "ckpt.pth").write_bytes(b"x")
    os.link(tmp_path / "ckpt.pth", tmp_path / "alias.safetensors")
    with pytest.raises(OutputError, match="is the input"):
        check_destination(tmp_path / "alias.safetensors", kind="file", force=True,
                          inputs=[tmp_path / "ckpt.pth"])


def test_a_missing_parent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        check_destination(tmp_path / "no" / "f", kind="file", force=False)


def test_an_interrupt_between_the_two_renames_puts_the_old_folder_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "exchange_paths", lambda first, second: False)
    old = folder_with(tmp_path / "dist", old="x")
    new = folder_with(tmp_path / "new", new="y")
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self == new:
            raise KeyboardInterrupt  # SIGTERM unwinds as KeyboardInterrupt (cli._interrupt)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_path(new, old)
    assert [p.name for p in old.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "new"]

"""Atomic, checked output: nothing half-written, nothing overwritten by surprise."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mobileone_cli.errors import OutputError

CHUNK = 1 << 20


def check_output_path(path: Path, *, force: bool) -> None:
    """Refuse, before any work, an output that exists or whose folder does not."""
    if not path.parent.exists():
        raise OutputError(f"output folder {path.parent} does not exist",
                          hint="create it first, or choose another -o path")
    if path.exists() and not force:
        raise OutputError(f"{path} already exists", hint="pass --force to overwrite it")


@contextmanager
def staging_path(destination: Path) -> Iterator[Path]:
    """A path inside a hidden temporary folder beside `destination`, removed on exit.

    Beside, so the final move is a rename on the same file system; inside a
    folder, so a file, a Core ML package and a whole bundle are staged alike.
    On any exception, KeyboardInterrupt included, nothing is left behind.
    """
    handle = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial",
                                   dir=destination.parent))
    try:
        yield handle / destination.name
    finally:
        remove_path(handle)


def replace_path(source: Path, destination: Path) -> None:
    """Move a finished file or folder over `destination` (atomic for files)."""
    if source.is_dir():
        # A directory cannot atomically replace a non-empty one: move the old aside first.
        if destination.exists():
            aside = destination.with_name(f".{destination.name}.old")
            remove_path(aside)
            destination.rename(aside)
            source.rename(destination)
            remove_path(aside)
        else:
            source.rename(destination)
    else:
        if destination.is_dir():
            shutil.rmtree(destination)
        os.chmod(source, 0o644)
        os.replace(source, destination)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder (sorted relative paths and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_files(root: Path, files: Sequence[Path]) -> str:
    """sha256 of a list of files under `root`: each sorted relative path, then its contents."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with file.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size

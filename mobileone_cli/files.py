"""Atomic, checked output: nothing half-written, nothing overwritten by surprise."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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
    """Remove a file, link or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def sha256_path(path: Path) -> str:
    """sha256 of a file; of a folder, the sha256 of its `sha256sum` listing.

    For a folder (a Core ML package) the listing is one line per regular file,
    `<sha256 of the file>  <path relative to the folder>`, sorted by path as
    bytes, which this shell line reproduces:
    `cd X.mlpackage && find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum`
    """
    if not path.is_dir():
        return _sha256_file(path)
    files = sorted((p for p in path.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix().encode())
    listing = "".join(f"{_sha256_file(file)}  {file.relative_to(path).as_posix()}\n"
                      for file in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size

"""Checked, atomic output: nothing half-written, nothing of the user's replaced by surprise.

Every check of a destination runs in `check_destination`, before any work: a fold that
takes a minute must not end in "cannot write". Then the output is staged beside its
destination and moved into place by `replace_path`: a rename for a new path, an atomic
exchange (Linux renameat2) when replacing, so the old output stays reachable until the
new one is in place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mobileone_cli.errors import OutputError, printable
from mobileone_cli.manifest import MANIFEST, tool_written, unlisted_files

CHUNK = 1 << 20
KINDS = ("file", "package", "bundle")
"""A single file; a Core ML .mlpackage folder; a bundle folder with a manifest.json."""
STAGING_RANDOM = 8
"""Random characters tempfile.mkdtemp puts in a staging folder's name."""
SPACE_MARGIN = 1.1
"""Free space asked for beyond the expected size (file-system blocks, metadata)."""
# Errors of the machine, not of the tool: one line instead of a traceback.
_WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.ENAMETOOLONG: "the file name is too long"}


def staging_name(name: str) -> str:
    """The longest name staging gives an output's temporary folder (`.{name}.XXXXXXXX.partial`)."""
    return f".{name}.{'X' * STAGING_RANDOM}.partial"


def check_destination(path: Path, *, kind: str, force: bool, inputs: Iterable[Path | None] = (),
                      expected_bytes: int = 0) -> None:
    """Refuse, before any work, a destination the output cannot or must not be written to.

    `kind` is one of KINDS; `inputs` are the files and folders the run reads (none may be
    replaced); `expected_bytes` the output's approximate size, checked against free space.
    A file never replaces a folder, a package only a package, a bundle only a bundle (a
    folder with a manifest.json) or an empty folder; with `force`, a bundle is replaced only
    when it holds nothing but what the tool wrote there.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    if str(path) == "-":
        raise OutputError("-o - would write a file named '-'; mobileone writes files, not "
                          "standard output", hint="give a file name, e.g. -o model.safetensors")
    if path.name in ("", ".", ".."):
        raise OutputError(f"-o {path} names an existing folder, not a new output",
                          hint="give a name inside it, e.g. -o ./mobileone_s0-export")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist",
                          hint="create it first, or choose another -o path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable",
                          hint="choose another -o path, or fix the folder's permissions")
    _check_name_length(path)
    _check_not_an_input(path, kind=kind, inputs=[p for p in inputs if p is not None])
    if path.exists() or path.is_symlink():
        _check_replaceable(path, kind=kind, force=force)
    _check_free_space(parent, expected_bytes)


def _check_name_length(path: Path) -> None:
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    name_bytes = len(os.fsencode(path.name))
    staged_bytes = len(os.fsencode(staging_name(path.name)))
    if staged_bytes > limit:
        raise OutputError(f"output name {printable(path.name)!r} is too long: with the staging "
                          f"suffix it takes {staged_bytes} bytes, over the file system's "
                          f"{limit}", hint=f"use a name of at most "
                                           f"{limit - staged_bytes + name_bytes} bytes")


def _check_not_an_input(path: Path, *, kind: str, inputs: list[Path]) -> None:
    target = path.resolve()
    for source in inputs:
        resolved = source.resolve()
        if resolved == target or _same_file(path, source):
            raise OutputError(f"-o {path} is the input {source}; writing it would replace it",
                              hint="choose another -o path")
        if kind != "file" and resolved.is_relative_to(target):
            raise OutputError(f"-o {path} holds the input {source}; replacing it would delete it",
                              hint="choose another -o path")


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _check_replaceable(path: Path, *, kind: str, force: bool) -> None:
    """An existing destination: refuse what no --force may replace, then ask for --force."""
    if path.is_symlink() and path.is_dir():
        raise OutputError(f"{path} is a symbolic link to a folder; mobileone does not write "
                          "through links", hint="remove the link, or choose another -o path")
    is_folder = path.is_dir()
    if kind == "file" and is_folder:
        raise OutputError(f"{path} is a folder; a file output never replaces a folder",
                          hint="choose a file name, e.g. -o " + str(path / "model.safetensors"))
    if kind == "package" and not (is_folder and (path / "Manifest.json").is_file()):
        raise OutputError(f"{path} exists and is not a Core ML package; it is never replaced",
                          hint="choose another -o path")
    if kind == "bundle":
        if not is_folder:
            raise OutputError(f"{path} is a file; a bundle is a folder and never replaces a file",
                              hint="choose another -o path")
        if not any(path.iterdir()):
            return  # an empty folder made for the bundle is not an existing output
        written = tool_written(path)
        if written is None:
            raise OutputError(f"{path} is a folder but not a mobileone bundle (no valid "
                              f"{MANIFEST}); it is never replaced",
                              hint="choose a new or empty folder for -o")
        others = unlisted_files(path, written)
        if others:
            shown = ", ".join(printable(name) for name in others[:5])
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            raise OutputError(f"bundle {path} also holds files mobileone did not write "
                              f"({shown}{more}); --force replaces only a bundle's own files",
                              hint="move those files elsewhere, or choose another -o path")
    if not force:
        raise OutputError(f"{path} already exists", hint="pass --force to overwrite it")


def _check_free_space(folder: Path, expected_bytes: int) -> None:
    if expected_bytes <= 0:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    needed = int(expected_bytes * SPACE_MARGIN)
    if free < needed:
        raise OutputError(f"{folder} has {free / 1e6:,.1f} MB free; the output needs about "
                          f"{needed / 1e6:,.1f} MB", hint="free some space, or choose another -o path")


@contextmanager
def staging_path(destination: Path) -> Iterator[Path]:
    """A path inside a hidden temporary folder beside `destination`, removed on exit.

    Beside, so the final move is a rename on the same file system; inside a
    folder, so a file, a Core ML package and a whole bundle are staged alike.
    On any exception, KeyboardInterrupt included, nothing is left behind.
    Errors of the machine (full disk, read-only file system, permissions) become one
    OutputError line naming `destination`.
    """
    try:
        handle = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial",
                                       dir=destination.parent))
    except OSError as error:
        raise _write_error(destination, error) from None
    try:
        yield handle / destination.name
    except OSError as error:
        if error.errno in _WRITE_ERRORS:
            raise _write_error(destination, error) from None
        raise
    finally:
        remove_path(handle)


def _write_error(destination: Path, error: OSError) -> OutputError:
    reason = _WRITE_ERRORS.get(error.errno or 0, error.strerror or type(error).__name__)
    return OutputError(f"cannot write {destination}: {reason}; nothing was written",
                       hint="free some space or choose another -o path")


def replace_path(source: Path, destination: Path) -> None:
    """Move a finished file or folder to `destination`, keeping any old one until then.

    A file replaces a file by one atomic rename. A folder replaces a folder by an atomic
    exchange (Linux renameat2 RENAME_EXCHANGE): `source` then holds the old output, removed
    by the caller's staging cleanup. Where there is no exchange, the old folder is renamed
    aside first, and if the second rename fails the error says where the old one is.
    `check_destination` has already refused every replacement of one kind by another.
    """
    if not source.is_dir():
        os.chmod(source, 0o644)
        os.replace(source, destination)
        return
    if not (destination.exists() or destination.is_symlink()):
        source.rename(destination)
        return
    if exchange_paths(source, destination):
        return
    aside = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.old")
    destination.rename(aside)
    try:
        source.rename(destination)
    except OSError as error:
        raise OutputError(f"could not move the new output to {destination} "
                          f"({error.strerror}); the old one is at {aside}",
                          hint=f"rename {aside.name} back to {destination.name}") from None
    except BaseException:  # interrupted between the two renames: put the old one back
        if not (destination.exists() or destination.is_symlink()):
            aside.rename(destination)
        raise
    remove_path(aside)


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    function = _renameat2()
    if function is None:
        return False
    result = function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second),
                      RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or file system
        return False
    raise OSError(code, os.strerror(code), str(second))


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = library.renameat2  # glibc 2.28 and later
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree; a link is removed, never what it points to."""
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
    return sha256_files(path, [p for p in path.rglob("*") if p.is_file()])


def sha256_files(root: Path, files: Sequence[Path]) -> str:
    """The sha256 of the `sha256sum` listing of `files` under `root`, sorted by path as bytes
    (a folder's hash, and a calibration set's: the same scheme, see `sha256_path`)."""
    ordered = sorted(files, key=lambda p: p.relative_to(root).as_posix().encode())
    listing = "".join(f"{_sha256_file(file)}  {file.relative_to(root).as_posix()}\n"
                      for file in ordered)
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

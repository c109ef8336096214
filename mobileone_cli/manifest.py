"""Reading a bundle's manifest.json without trusting it: schema, paths, and the files it covers.

A manifest is input like any other file: it may have been edited, truncated or written
by hand to point elsewhere. So before any file it names is opened:
- it is a regular file of bounded size holding one JSON object;
- it matches the schema of its declared version, key by key and type by type (the schema
  is data, `SCHEMAS`, so a later version adds fields by adding entries);
- every artifact path is relative, normalised (no `.`, `..`, empty part, backslash or
  drive) and so inside the bundle;
- in the bundle, every listed path is a regular file or a folder (a Core ML package) of
  regular files, reached without a symbolic link, and nothing is there that it does not list.

Pure path and JSON work: no hashing (files.py), no model code; it imports only errors.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mobileone_cli.errors import (
    BadArtifactError,
    VerificationFailedError,
    printable,
)

MANIFEST = "manifest.json"
SUMMARY = "summary.md"
SCHEMA_V1 = "mobileone-manifest/1"
SCHEMA_V2 = "mobileone-manifest/2"
MANIFEST_BYTES = 16 << 20
"""Largest manifest read: a real one is a few KB."""
BUNDLE_HINT = "pass the manifest.json of a bundle written by `mobileone export --to all`"
REBUILD_HINT = "rebuild the bundle with `mobileone export --to all`"


class ManifestError(BadArtifactError):
    """A manifest that cannot be trusted as written: unreadable, off-schema, or unsafe paths."""


class BundleContentError(VerificationFailedError):
    """A bundle whose files are not what its manifest lists (extra, linked, not regular)."""


# -- the schema, as data ---------------------------------------------------------------------
@dataclass(frozen=True)
class Nullable:
    """A value that may be null."""

    inner: Any


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose items all match `item`; at least `min_items` of them."""

    item: Any
    min_items: int = 0


@dataclass(frozen=True)
class MapOf:
    """A JSON object with any keys whose values all match `value`."""

    value: Any


@dataclass(frozen=True)
class Pattern:
    """A string matching `regex` in full; `description` says what it is in messages."""

    regex: str
    description: str


@dataclass(frozen=True)
class OneOf:
    """A string among `choices`."""

    choices: tuple[str, ...]


NUMBER = "number"
"""An int or a float, never a bool."""
ANY_OBJECT = MapOf(object)
SHA256 = Pattern(r"[0-9a-f]{64}", "a 64-digit lowercase hex sha256")
ARTIFACT_FORMATS = ("safetensors", "onnx", "coreml")

# Each object is a dict of its required keys; extra keys are allowed (a newer writer may add
# some) and ignored. Add a version by adding an entry to SCHEMAS.
MANIFEST_V1: dict[str, Any] = {
    "schema": str,
    "tool": {"name": str, "version": str, "command": ListOf(str)},
    "versions": MapOf(str),
    "source": {"name": str, "bytes": int, "sha256": SHA256, "layout": str, "dtype": str,
               "ema": bool},
    "model": {"variant": str, "layout": str, "num_classes": Nullable(int),
              "params": {"train": int, "fused": int},
              "macs": {"train": int, "fused": int, "input_size": ListOf(int, 2)}},
    "input": {"name": str, "shape": ListOf(int, 4), "mean": ListOf(NUMBER, 3),
              "std": ListOf(NUMBER, 3)},
    "fold_verification": ANY_OBJECT,
    "artifacts": ListOf({"path": str, "format": OneOf(ARTIFACT_FORMATS), "bytes": int,
                         "sha256": SHA256, "verification": Nullable(ANY_OBJECT)}, min_items=1),
    "gates": ListOf(ANY_OBJECT),
}
# v2 (what `mobileone export` writes now): per artifact its runtime, what it declares,
# its precision and format details, and the cost of a reduced precision; `input.scale` a
# number; the labels' count and hash; the targets `--to all` skipped.
_DECLARED_TENSOR = {"name": str, "dtype": Nullable(str)}
MANIFEST_V2: dict[str, Any] = {
    **MANIFEST_V1,
    "input": {**MANIFEST_V1["input"], "scale": NUMBER, "layout": str, "channel_order": str},
    "labels": Nullable({"count": int, "sha256": SHA256}),
    # Any registered target's name: the registry, not the schema, knows the targets.
    "artifacts": ListOf({"path": str, "format": str, "bytes": int, "sha256": SHA256,
                         "runtime": Nullable(str), "precision": Nullable(str),
                         "inputs": ListOf(_DECLARED_TENSOR, 1), "outputs": ListOf(_DECLARED_TENSOR),
                         "format_details": ANY_OBJECT, "verification": Nullable(ANY_OBJECT),
                         "cost": Nullable(ANY_OBJECT),
                         "companions": ListOf({"path": str, "sha256": SHA256, "bytes": int})},
                        min_items=1),
    "skipped": ListOf({"target": str, "reason": str}),
}
SCHEMAS: dict[str, dict[str, Any]] = {SCHEMA_V1: MANIFEST_V1, SCHEMA_V2: MANIFEST_V2}


def json_schema(version: str = SCHEMA_V2) -> dict[str, Any]:
    """The manifest schema `version` as a JSON Schema (draft 2020-12) document.

    Generated from the same data `validate` reads, so the file shipped beside this
    module (`manifest.schema.json`, kept equal by tests/test_manifest_schema.py) lets
    a pipeline in any language check a manifest as `verify --manifest` does.
    """
    document = _json_schema(SCHEMAS[version])
    document["properties"]["schema"] = {"const": version}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://mobileone.invalid/{version}", "title": f"mobileone manifest ({version})",
            **document}


def _json_schema(schema: Any) -> dict[str, Any]:
    if isinstance(schema, dict):
        return {"type": "object", "required": sorted(schema),
                "properties": {key: _json_schema(inner) for key, inner in schema.items()}}
    if isinstance(schema, Nullable):
        return {"anyOf": [{"type": "null"}, _json_schema(schema.inner)]}
    if isinstance(schema, ListOf):
        return {"type": "array", "items": _json_schema(schema.item),
                **({"minItems": schema.min_items} if schema.min_items else {})}
    if isinstance(schema, MapOf):
        inner = {} if schema.value is object else {"additionalProperties": _json_schema(schema.value)}
        return {"type": "object", **inner}
    if isinstance(schema, Pattern):
        return {"type": "string", "pattern": f"^(?:{schema.regex})$"}
    if isinstance(schema, OneOf):
        return {"enum": list(schema.choices)}
    named = {NUMBER: "number", int: "integer", str: "string", bool: "boolean"}
    return {"type": named[schema]}


def validate(value: Any, schema: Any, *, where: str) -> None:
    """Raise ManifestError naming the first key of `value` that does not match `schema`."""
    if isinstance(schema, dict):
        _expect(isinstance(value, dict), where, "an object", value)
        for key, inner in schema.items():
            if key not in value:
                raise ManifestError(f"the manifest has no key {_name(f'{where}.{key}')}",
                                    hint=REBUILD_HINT)
            validate(value[key], inner, where=f"{where}.{key}")
    elif isinstance(schema, Nullable):
        if value is not None:
            validate(value, schema.inner, where=where)
    elif isinstance(schema, ListOf):
        _expect(isinstance(value, list), where, "a list", value)
        if len(value) < schema.min_items:
            raise ManifestError(f"{_name(where)} has {len(value)} entries, at least "
                                f"{schema.min_items} expected", hint=REBUILD_HINT)
        for index, item in enumerate(value):
            validate(item, schema.item, where=f"{where}[{index}]")
    elif isinstance(schema, MapOf):
        _expect(isinstance(value, dict), where, "an object", value)
        if schema.value is not object:
            for key, item in value.items():
                validate(item, schema.value, where=f"{where}.{key}")
    elif isinstance(schema, Pattern):
        _expect(isinstance(value, str) and re.fullmatch(schema.regex, value) is not None,
                where, schema.description, value)
    elif isinstance(schema, OneOf):
        _expect(value in schema.choices, where, f"one of {', '.join(schema.choices)}", value)
    elif schema == NUMBER:
        _expect(isinstance(value, int | float) and not isinstance(value, bool), where,
                "a number", value)
    elif schema is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), where, "an integer",
                value)
    else:
        _expect(isinstance(value, schema), where, f"a {schema.__name__}", value)


def _name(where: str) -> str:
    return printable(where.removeprefix(".")) or "the manifest"


def _expect(condition: bool, where: str, expected: str, value: Any) -> None:
    if not condition:
        shown = printable(json.dumps(value)[:40]) if _jsonable(value) else type(value).__name__
        raise ManifestError(f"{_name(where)} must be {expected}, not {shown}", hint=REBUILD_HINT)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# -- reading -----------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path`, validated against its schema and with every path confined.

    Raises ManifestError (exit 1) for anything that is not a well-formed manifest; no file
    it names has been opened when this returns or raises.
    """
    try:
        status = path.lstat()
    except OSError as error:
        raise ManifestError(f"cannot read manifest {path} ({error.strerror})",
                            hint=BUNDLE_HINT) from None
    if not stat.S_ISREG(status.st_mode):
        raise ManifestError(f"manifest {path} is not a regular file", hint=BUNDLE_HINT)
    if status.st_size > MANIFEST_BYTES:
        raise ManifestError(f"manifest {path} is {status.st_size:,} bytes, over the "
                            f"{MANIFEST_BYTES:,}-byte bound of a manifest", hint=BUNDLE_HINT)
    try:
        with path.open("rb") as stream:
            manifest = json.loads(stream.read(MANIFEST_BYTES + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise ManifestError(f"cannot read manifest {path}: {printable(reason)}",
                            hint=BUNDLE_HINT) from None
    schema_name = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema_name not in SCHEMAS:
        raise ManifestError(f"{path} is not a mobileone manifest (schema "
                            f"{', '.join(SCHEMAS)})", hint=BUNDLE_HINT)
    validate(manifest, SCHEMAS[schema_name], where="")
    paths = list(shipped_paths(manifest))
    for index, entry in enumerate(paths):
        check_relative(entry, where=f"artifacts[{index}].path")
    duplicates = sorted({entry for entry in paths if paths.count(entry) > 1})
    if duplicates:
        raise ManifestError(f"artifacts list {printable(duplicates[0])} more than once",
                            hint=REBUILD_HINT)
    return manifest


def check_relative(entry: str, *, where: str) -> PurePosixPath:
    """`entry` as a normalised relative path inside the bundle; ManifestError otherwise."""
    posix = PurePosixPath(entry)
    problem = None
    if not entry or "\0" in entry:
        problem = "is empty or holds a NUL byte"
    elif posix.is_absolute() or PureWindowsPath(entry).drive or entry.startswith("~"):
        problem = "is absolute"
    elif "\\" in entry:
        problem = "holds a backslash"
    elif any(part in ("", ".", "..") for part in entry.split("/")):
        problem = "is not normalised (an empty, '.' or '..' part)"
    elif entry in (MANIFEST, SUMMARY):
        problem = "names the manifest or the summary"
    if problem is not None:
        raise ManifestError(f"{where} {printable(entry)!r} {problem}; a manifest path must be "
                            "relative and inside the bundle", hint=REBUILD_HINT)
    return posix


# -- the bundle on disk ------------------------------------------------------------------------
def listed_paths(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """Every path a bundle may hold: its artifacts and their companions, manifest.json and
    summary.md."""
    return (*shipped_paths(manifest), MANIFEST, SUMMARY)


def shipped_paths(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """Every artifact's path and its companions' (v2), in manifest order."""
    return tuple(record["path"] for artifact in manifest["artifacts"]
                 for record in (artifact, *artifact.get("companions", ())))


def check_bundle_files(folder: Path, manifest: Mapping[str, Any]) -> dict[str, Path | None]:
    """Each artifact path to its file (None when missing), after checking what is there.

    Raises BundleContentError (exit 3) when a listed path goes through a symbolic link, is
    not a regular file (or a folder of them), or when the bundle holds a file its manifest
    does not list. Nothing is opened; only `lstat` is called.
    """
    found: dict[str, Path | None] = {}
    for entry in shipped_paths(manifest):
        found[entry] = _regular(folder, entry)
    unlisted = unlisted_files(folder, listed_paths(manifest))
    if unlisted:
        shown = ", ".join(printable(name) for name in unlisted[:5])
        more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        raise BundleContentError(f"the bundle at {folder} holds files its manifest does not "
                                 f"list: {shown}{more}",
                                 hint="remove them, or " + REBUILD_HINT.lower())
    return found


def _regular(folder: Path, entry: str) -> Path | None:
    """`folder/entry` if it and every folder on the way are real (not linked); None if absent."""
    path = folder
    for part in entry.split("/"):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            raise BundleContentError(f"{path} is a symbolic link; a bundle holds only regular "
                                     "files", hint=REBUILD_HINT)
    if stat.S_ISREG(mode):
        return path
    if not stat.S_ISDIR(mode):
        raise BundleContentError(f"{path} is not a regular file", hint=REBUILD_HINT)
    for inner in _walk(path):
        inner_mode = (path / inner).lstat().st_mode
        if not stat.S_ISREG(inner_mode):
            kind = "a symbolic link" if stat.S_ISLNK(inner_mode) else "not a regular file"
            raise BundleContentError(f"{path / inner} is {kind}; a bundle holds only regular "
                                     "files", hint=REBUILD_HINT)
    return path


def _walk(folder: Path) -> list[str]:
    """Every non-folder entry under `folder` (links not followed), as relative POSIX paths."""
    entries = []
    for root, folders, files in os.walk(folder, followlinks=False):
        base = Path(root).relative_to(folder)
        # os.walk lists a link to a folder among the folders: report it, do not descend.
        entries += [(base / name).as_posix() for name in files]
        entries += [(base / name).as_posix() for name in folders
                    if (Path(root) / name).is_symlink()]
    return entries


def tool_written(folder: Path) -> tuple[str, ...] | None:
    """The paths `mobileone export` wrote in an existing bundle, per its manifest.

    None when `folder` holds no readable manifest.json: it is not a bundle, and a bundle
    must never replace it. Paths the manifest would place outside the folder are refused.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = read_manifest(manifest_path)
    except ManifestError:
        return None
    return listed_paths(manifest)


def unlisted_files(folder: Path, listed: tuple[str, ...]) -> list[str]:
    """Files under `folder` that none of `listed` (files or package folders) covers."""
    return sorted(relative for relative in _walk(folder)
                  if not any(relative == entry or relative.startswith(f"{entry}/")
                             for entry in listed))

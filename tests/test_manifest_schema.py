"""The manifest's JSON Schema ships in the package, matches what `verify --manifest` checks,
and a bundle's check leaves the bundle exactly as it was."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from mobileone_cli import api
from mobileone_cli.manifest import SCHEMA_V2, json_schema
from mobileone_cli.options import ExportOptions

SIZE = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, s0_checkpoint: Path) -> Path:
    folder = tmp_path_factory.mktemp("schema") / "dist"
    result = api.export(ExportOptions(source=s0_checkpoint, targets=("safetensors", "coreml"),
                                      output=folder, input_size=SIZE))
    assert result.written, result.to_dict()
    return folder


def shipped() -> dict:
    return json.loads(resources.files("mobileone_cli").joinpath("manifest.schema.json")
                      .read_text(encoding="utf-8"))


def test_the_shipped_schema_is_the_one_the_code_checks() -> None:
    assert shipped() == json_schema(SCHEMA_V2)
    jsonschema.Draft202012Validator.check_schema(shipped())


def test_a_written_manifest_validates_and_a_broken_one_does_not(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    jsonschema.validate(manifest, shipped())
    for broken in ({**manifest, "artifacts": []}, {**manifest, "schema": "mobileone-manifest/1"},
                   {key: value for key, value in manifest.items() if key != "source"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, shipped())


def _state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(folder)): (path.read_bytes(), os.stat(path).st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_verify_never_writes_into_what_it_verifies(bundle: Path, s0_checkpoint: Path) -> None:
    before = _state(bundle)
    check = api.verify_bundle(bundle / "manifest.json", against=s0_checkpoint)
    assert check.passed, check.to_dict()
    assert _state(bundle) == before  # every byte and every modification time

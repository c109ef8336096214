"""The Python facade: one function per command, options in, frozen results out."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from mobileone_cli import api
from mobileone_cli.errors import BadArtifactError
from mobileone_cli.options import ExportOptions, FoldOptions, VerifyOptions
from mobileone_cli.results import ArtifactCheck, ExportResult, ModelSummary

SIZE = 64


def test_the_facade_has_one_documented_function_per_job() -> None:
    jobs = {name for name, value in vars(api).items()
            if inspect.isfunction(value) and not name.startswith("_")
            and value.__module__ == api.__name__}
    assert jobs == {"inspect", "fold", "export", "verify", "verify_bundle", "report",
                    "sensitivity", "demo"}
    for name in jobs:
        assert getattr(api, name).__doc__, name


def test_fold_and_export_return_the_same_frozen_result(s0_checkpoint: Path, tmp_path: Path) -> None:
    folded = api.fold(FoldOptions(checkpoint=s0_checkpoint, output=tmp_path / "s0.safetensors",
                                  input_size=SIZE))
    exported = api.export(ExportOptions(source=s0_checkpoint, targets=("safetensors",),
                                        output=tmp_path / "again.safetensors", input_size=SIZE))
    for result in (folded, exported):
        assert isinstance(result, ExportResult) and result.passed and result.written
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.written = False  # type: ignore[misc]
    assert folded.to_dict().keys() == exported.to_dict().keys()
    # The same job twice gives the same bytes.
    assert folded.artifacts[0].sha256 == exported.artifacts[0].sha256


def test_inspect_and_verify(s0_checkpoint: Path, tmp_path: Path) -> None:
    summary = api.inspect(s0_checkpoint)
    assert isinstance(summary, ModelSummary) and summary.variant == "s0"
    output = tmp_path / "s0.onnx"
    api.export(ExportOptions(source=s0_checkpoint, targets=("onnx",), output=output,
                             input_size=SIZE))
    check = api.verify(VerifyOptions(artifact=output, against=s0_checkpoint))
    assert isinstance(check, ArtifactCheck) and check.passed
    assert check.artifact.declared is not None
    assert check.artifact.declared.static_size == SIZE


def test_an_unreadable_artifact_is_bad_input(s0_checkpoint: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(BadArtifactError, match="is not an ONNX model"):
        api.verify(VerifyOptions(artifact=garbage, against=s0_checkpoint))
    package = tmp_path / "empty.mlpackage"
    package.mkdir()
    with pytest.raises(BadArtifactError, match=r"is not a readable \.mlpackage"):
        api.verify(VerifyOptions(artifact=package, against=s0_checkpoint))

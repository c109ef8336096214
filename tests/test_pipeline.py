"""The export pipeline takes any backend of the `Backend` shape: a toy one, registered here
only, is staged, written, proven, gated and refused exactly like the real targets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mobileone_cli import api, options
from mobileone_cli.errors import UsageError
from mobileone_cli.export.backend import Candidate, WriteContext
from mobileone_cli.export.registry import BACKENDS
from mobileone_cli.options import ExportOptions, Gates
from mobileone_cli.proof.compare import torch_runner
from mobileone_cli.results import Declared

SIZE = 64


class ToyBackend:
    """A pickled torch module as an artifact; `damage` alters the written copy."""

    suffix = ".toy"
    extra = "toy"

    def __init__(self, name: str = "toy", *, missing: str | None = None,
                 damage: Callable[[torch.nn.Module], None] | None = None) -> None:
        self.name = name
        self._missing = missing
        self._damage = damage
        self.written: list[Path] = []

    def missing(self) -> str | None:
        return self._missing

    def write(self, model: torch.nn.Module, path: Path, *, context: WriteContext) -> None:
        copy = torch.nn.Sequential(model).eval()
        if self._damage is not None:
            self._damage(copy)
        torch.save(copy, path)
        self.written.append(path)

    def companions(self, path: Path) -> tuple[Path, ...]:
        return ()

    def open(self, path: Path) -> Candidate:
        model = torch.load(path, weights_only=False)
        declared = Declared(runtime=f"torch {torch.__version__}", input_name="image",
                            input_shape=("batch", 3, "height", "width"), output_names=("logits",))
        return Candidate(declared=declared, run=torch_runner(model),
                         run_full_precision=torch_runner(model))


def _scale_one_weight(model: torch.nn.Module) -> None:
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch) -> Callable[[ToyBackend], ToyBackend]:
    def add(backend: ToyBackend) -> ToyBackend:
        monkeypatch.setitem(BACKENDS, backend.name, backend)
        return backend
    return add


def _export(source: Path, targets: tuple[str, ...], output: Path, **changes: Any) -> Any:
    return api.export(ExportOptions(source=source, targets=targets, output=output,
                                    input_size=SIZE, **changes))


def test_every_registered_target_is_a_backend_and_a_choice_of_the_cli() -> None:
    assert tuple(BACKENDS) == options.TARGETS
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.suffix.startswith(".")
        assert callable(backend.missing) and callable(backend.write) and callable(backend.open)
        assert callable(backend.companions)


def test_a_toy_target_is_written_and_proven_like_the_real_ones(
    s0_checkpoint: Path, tmp_path: Path, register: Callable[[ToyBackend], ToyBackend]
) -> None:
    toy = register(ToyBackend())
    output = tmp_path / "model.toy"
    result = _export(s0_checkpoint, ("toy",), output)
    assert result.passed and result.written and output.is_file()
    [artifact] = result.artifacts
    assert (artifact.format, artifact.path) == ("toy", output)
    assert artifact.verification is not None and artifact.verification.passed
    assert artifact.declared is not None and artifact.declared.runtime.startswith("torch")
    # Written to a staging path beside the destination, then moved into place.
    [staged] = toy.written
    assert staged.parent.parent == tmp_path and staged.parent.name.endswith(".partial")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.toy"]


def test_a_toy_target_that_converts_wrongly_fails_its_proof_and_writes_nothing(
    s0_checkpoint: Path, tmp_path: Path, register: Callable[[ToyBackend], ToyBackend]
) -> None:
    register(ToyBackend(damage=_scale_one_weight))
    result = _export(s0_checkpoint, ("toy",), tmp_path / "model.toy")
    assert not result.passed and not result.written and result.exit_code == 3
    [artifact] = result.artifacts
    assert artifact.verification is not None
    assert artifact.verification.max_rel_diff > 10 * artifact.verification.rtol
    assert list(tmp_path.iterdir()) == []


def test_a_toy_target_is_gated_like_the_real_ones(
    s0_checkpoint: Path, tmp_path: Path, register: Callable[[ToyBackend], ToyBackend]
) -> None:
    register(ToyBackend())
    result = _export(s0_checkpoint, ("toy",), tmp_path / "model.toy",
                     gates=Gates(max_size_mb=0.001))
    [gate] = result.gates
    assert (gate.name, gate.passed, result.written) == ("max_size_mb", False, False)
    assert list(tmp_path.iterdir()) == []


def test_a_target_whose_packages_are_missing_is_refused_alone_and_skipped_in_a_bundle(
    s0_checkpoint: Path, tmp_path: Path, register: Callable[[ToyBackend], ToyBackend]
) -> None:
    register(ToyBackend(missing="toyruntime is not installed"))
    with pytest.raises(UsageError) as refused:
        _export(s0_checkpoint, ("toy",), tmp_path / "model.toy")
    assert refused.value.message == "--to toy: toyruntime is not installed"
    assert refused.value.hint == 'pip install "mobileone-cli[toy]"'

    bundle = _export(s0_checkpoint, ("safetensors", "toy"), tmp_path / "dist")
    assert bundle.written and bundle.skipped == (("toy", "toyruntime is not installed"),)
    assert [artifact.format for artifact in bundle.artifacts] == ["safetensors"]

    with pytest.raises(UsageError, match="toyruntime is not installed"):
        _export(s0_checkpoint, ("safetensors", "toy"), tmp_path / "dist2", required=("toy",))
    assert not (tmp_path / "dist2").exists()


def test_a_bundle_records_each_targets_declaration_and_is_checked_again(
    s0_checkpoint: Path, tmp_path: Path, register: Callable[[ToyBackend], ToyBackend]
) -> None:
    register(ToyBackend())
    result = _export(s0_checkpoint, ("safetensors", "toy"), tmp_path / "dist")
    assert result.written and result.bundle == tmp_path / "dist"
    check = api.verify_bundle(tmp_path / "dist" / "manifest.json", against=s0_checkpoint)
    assert check.passed, check.to_dict()
    assert [verified.artifact.format for verified in check.verifications] == ["safetensors", "toy"]


def test_a_suffix_that_is_not_the_targets_is_refused_before_any_work(
    s0_checkpoint: Path, tmp_path: Path, register: Callable[[ToyBackend], ToyBackend]
) -> None:
    toy = register(ToyBackend())
    with pytest.raises(UsageError) as refused:
        _export(s0_checkpoint, ("toy",), tmp_path / "model.onnx")
    assert refused.value.hint == "name it model.toy"
    assert toy.written == []

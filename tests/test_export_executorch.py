"""The ExecuTorch backend: Apple's S0 lowered to XNNPACK and proven in executorch.runtime.

Lowering takes about 9 s of CPU a model at 64 px (the first in a process pays
about 10 s more: imports and XNNPACK's pattern tables), so S0 is written once per
module and every check reads that file, and a second time for the byte-identity
check. S0-S4 in the other layouts (which load to Apple's models bit for bit) go
through the public API in tests/test_on_device_layouts.py. About 30 s of CPU for
the module.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mobileone_cli.errors import EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, MobileOneError
from mobileone_cli.export import executorch as backend
from mobileone_cli.export.runtimes import METADATA_SCHEMA
from tests.on_device import (
    SIZE,
    Folded,
    assert_tampering_is_caught,
    fold,
)

installed = pytest.mark.skipif(backend.missing() is not None, reason=backend.missing() or "")


@pytest.fixture(scope="module")
def written(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Folded, Path]]:
    if backend.missing() is not None:
        pytest.skip(backend.missing() or "")
    folded = fold(make_checkpoint("s0"), "s0")
    path = tmp_path_factory.mktemp("executorch") / "s0.pte"
    backend.write(folded.model, path, context=folded.context())
    return {"s0": (folded, path)}


@installed
def test_apples_s0_is_proven_in_executorch(written: dict[str, tuple[Folded, Path]]) -> None:
    folded, path = written["s0"]
    candidate = backend.open(path)
    verification = folded.prove(candidate)
    assert verification.passed, verification
    assert folded.error_against_folded(candidate) <= verification.rtol
    assert verification.top1_agreement == 1.0


@installed
def test_declared_is_read_from_the_file(written: dict[str, tuple[Folded, Path]]) -> None:
    _folded, path = written["s0"]
    declared = backend.open(path).declared
    assert declared.runtime.startswith("executorch ")
    assert (declared.input_name, declared.input_shape) == ("image", (1, 3, SIZE, SIZE))
    assert declared.output_names == ("logits",)
    assert (declared.layout, declared.dtype, declared.precision) == ("NCHW", "float32", "fp32")
    details = declared.details
    assert details["methods"] == ["forward", backend.METADATA_METHOD]
    assert details["delegates"] == [backend.DELEGATE]
    # Everything but the head's global mean runs in XNNPACK (see the module docstring).
    assert details["portable_operators"] == ["aten::mean.out"]
    assert details["normalization"] == {"mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225], "pixel_range": 255}
    assert details["labels"] == 1000
    assert details["metadata"]["mobileone.variant"] == "s0"


@installed
def test_the_metadata_method_returns_the_document(written: dict[str, tuple[Folded, Path]]
                                                  ) -> None:
    from executorch.runtime import Runtime

    folded, path = written["s0"]
    program = Runtime.get().load_program(path)
    (text,) = program.load_method(backend.METADATA_METHOD).execute([])
    document = json.loads(text)
    assert document["schema"] == METADATA_SCHEMA
    assert document["input"] == {"name": "image", "layout": "NCHW", "size": [SIZE, SIZE],
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                 "pixel_range": 255}
    assert document["labels"][:2] == ["class 0", "class 1"]
    assert document["metadata"] == dict(sorted(folded.context().metadata.items()))


@installed
def test_rewrite_is_byte_identical_and_quiet(written: dict[str, tuple[Folded, Path]],
                                             tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    folded, path = written["s0"]
    again = tmp_path / "s0.pte"
    backend.write(folded.model, again, context=folded.context())
    backend.open(again)(folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array)
    assert capfd.readouterr() == ("", "")
    assert again.read_bytes() == path.read_bytes()


@installed
def test_tampered_weights_give_wrong_outputs(written: dict[str, tuple[Folded, Path]],
                                             tmp_path: Path) -> None:
    folded, path = written["s0"]
    assert_tampering_is_caught(backend, path, folded, tmp_path)


@installed
def test_a_batch_runs_one_sample_at_a_time_and_other_sizes_are_refused(
        written: dict[str, tuple[Folded, Path]]) -> None:
    folded, path = written["s0"]
    candidate = backend.open(path)
    batch = folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array
    assert len(batch) == 2
    assert np.array_equal(candidate(batch)[1:], candidate(batch[1:]))
    with pytest.raises(ValueError, match=rf"s0.pte takes input of shape 1 x 3 x {SIZE} x {SIZE}"):
        candidate(np.zeros((1, 3, SIZE + 8, SIZE), dtype=np.float32))


@installed
def test_timed_runner_takes_the_declared_input(written: dict[str, tuple[Folded, Path]]) -> None:
    folded, path = written["s0"]
    batch = folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array[:1]
    run = backend.timed_runner(path, threads=1)
    assert np.array_equal(run(batch), backend.open(path)(batch))


@installed
@pytest.mark.parametrize(("content", "reason"), [
    (b"\0" * 64, "File size is too small"),
    (b"", "offset 0 + size"),
])
def test_a_file_that_is_not_a_program_is_bad_input(tmp_path: Path, content: bytes,
                                                   reason: str) -> None:
    path = tmp_path / "broken.pte"
    path.write_bytes(content)
    with pytest.raises(MobileOneError, match=r"broken\.pte is not an ExecuTorch program: ") as error:
        backend.open(path)
    assert error.value.exit_code == EXIT_BAD_INPUT
    assert "\n" not in error.value.message


@installed
def test_a_converter_failure_quotes_its_last_meaningful_line(
        written: dict[str, tuple[Folded, Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported: aten.frobnicate.default\n\n  File \"x.py\", line 1\n")

    monkeypatch.setattr(torch.export, "export", fail)
    folded, _path = written["s0"]
    with pytest.raises(MobileOneError) as error:
        backend.write(folded.model, tmp_path / "failed.pte", context=folded.context())
    assert error.value.exit_code == EXIT_EXPORT_FAILED
    assert error.value.message == ("ExecuTorch's XNNPACK lowering failed: "
                                   "Unsupported: aten.frobnicate.default")


def test_a_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    assert backend.missing() == ("the executorch target needs the 'executorch' package: "
                                 'pip install "mobileone-cli[executorch]"')

"""The LiteRT backend: S0 (NHWC input) and S4 (NCHW) proven in LiteRT's interpreter.

litert-torch takes about 8 s of CPU a conversion at 64 px, so this module converts
three times: S0 channels-last (the Android camera layout, checked against the
NCHW torch model), S4 channels-first with squeeze-excite (the other layout
and the deepest graph), and S0 again for byte identity. S1-S3 and the other
layouts go through the public API in tests/test_on_device_layouts.py.
About 33 s of CPU for the module.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mobileone_cli.errors import EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, MobileOneError, UsageError
from mobileone_cli.export import litert as backend
from mobileone_cli.export.runtimes import METADATA_SCHEMA
from mobileone_cli.options import LiteRTOptions
from tests.on_device import (
    SIZE,
    Folded,
    assert_tampering_is_caught,
    fold,
)

installed = pytest.mark.skipif(backend.missing() is not None, reason=backend.missing() or "")
NHWC = LiteRTOptions(channels_last=True)


@pytest.fixture(scope="module")
def written(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Folded, Path]]:
    """"s0" channels-last, "s4" channels-first."""
    if backend.missing() is not None:
        pytest.skip(backend.missing() or "")
    folder = tmp_path_factory.mktemp("litert")
    models = {}
    for variant, options in (("s0", NHWC), ("s4", None)):
        folded = fold(make_checkpoint(variant), variant)
        path = folder / f"{variant}.tflite"
        backend.write(folded.model, path, context=folded.context(options=options))
        models[variant] = (folded, path)
    return models


@installed
@pytest.mark.parametrize(("variant", "layout", "shape"), [
    ("s0", "NHWC", (1, SIZE, SIZE, 3)),
    ("s4", "NCHW", (1, 3, SIZE, SIZE)),
])
def test_both_layouts_are_proven_against_the_nchw_model(
        written: dict[str, tuple[Folded, Path]], variant: str, layout: str,
        shape: tuple[int, ...]) -> None:
    folded, path = written[variant]
    candidate = backend.open(path)
    assert (candidate.declared.layout, candidate.declared.input_shape) == (layout, shape)
    verification = folded.prove(candidate)  # NCHW batches in, whatever the file's layout
    assert verification.passed, verification
    assert folded.error_against_folded(candidate) <= verification.rtol
    assert verification.top1_agreement == 1.0


@installed
def test_the_nhwc_file_takes_nhwc_pixels(written: dict[str, tuple[Folded, Path]]) -> None:
    """Fed by hand in its own layout, the NHWC file computes the NCHW torch model."""
    import torch

    folded, path = written["s0"]
    batch = folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array[:1]
    run = backend.timed_runner(path, threads=1)
    output = run(np.ascontiguousarray(batch.transpose(0, 2, 3, 1)))
    with torch.inference_mode():
        expected = folded.model(torch.from_numpy(batch)).numpy()
    assert np.abs(output - expected).max() / np.abs(expected).max() < 1e-4


@installed
def test_declared_and_metadata_are_read_from_the_file(
        written: dict[str, tuple[Folded, Path]]) -> None:
    folded, path = written["s0"]
    declared = backend.open(path).declared
    assert declared.runtime.startswith("ai-edge-litert ")
    assert declared.input_name == "image"
    assert declared.output_names == ("logits",)
    assert (declared.dtype, declared.precision) == ("float32", "fp32")
    details = declared.details
    assert details["signature"] == backend.SIGNATURE
    assert details["operators"]["FULLY_CONNECTED"] == 1
    assert details["normalization"] == {"mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225], "pixel_range": 255}
    assert details["labels"] == 1000
    entries = backend.read_metadata(path.read_bytes())
    assert entries[backend.LABELS_NAME].decode().splitlines()[:2] == ["class 0", "class 1"]
    document = json.loads(entries[backend.METADATA_NAME])
    assert document["schema"] == METADATA_SCHEMA
    assert document["input"]["layout"] == "NHWC"
    assert document["metadata"] == dict(sorted(folded.context().metadata.items()))
    assert entries["min_runtime_version"].rstrip(b"\0") == b"2.0.0"  # the converter's, kept


@installed
def test_metadata_is_replaced_not_repeated_and_buffers_stay_aligned(
        written: dict[str, tuple[Folded, Path]]) -> None:
    from ai_edge_litert import schema_py_generated as schema

    _folded, path = written["s4"]
    data = path.read_bytes()
    again = backend.with_metadata(data, {backend.METADATA_NAME: b"{}"})
    entries = backend.read_metadata(again)
    assert entries[backend.METADATA_NAME] == b"{}"
    assert list(entries) == list(backend.read_metadata(data))
    assert backend.with_metadata(again, {backend.METADATA_NAME: b"{}"}) == again
    model = schema.Model.GetRootAs(again, 0)
    starts = [model.Buffers(index)._tab.Vector(model.Buffers(index)._tab.Offset(4))
              for index in range(model.BuffersLength()) if model.Buffers(index).DataLength()]
    assert starts and all(start % backend.BUFFER_ALIGNMENT == 0 for start in starts)


@installed
def test_rewrite_is_byte_identical_and_quiet(written: dict[str, tuple[Folded, Path]],
                                             tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    folded, path = written["s0"]
    again = tmp_path / "s0.tflite"
    backend.write(folded.model, again, context=folded.context(options=NHWC))
    backend.open(again)(folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array)
    assert capfd.readouterr() == ("", "")
    assert again.read_bytes() == path.read_bytes()


@installed
def test_tampered_weights_give_wrong_outputs(written: dict[str, tuple[Folded, Path]],
                                             tmp_path: Path) -> None:
    folded, path = written["s4"]
    assert_tampering_is_caught(backend, path, folded, tmp_path)


@installed
def test_a_batch_runs_one_sample_at_a_time_and_other_sizes_are_refused(
        written: dict[str, tuple[Folded, Path]]) -> None:
    folded, path = written["s0"]
    candidate = backend.open(path)
    batch = folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array
    assert np.array_equal(candidate(batch)[1:], candidate(batch[1:]))
    with pytest.raises(ValueError, match=rf"s0.tflite takes input of shape 1 x 3 x {SIZE} x "):
        candidate(np.zeros((1, 3, SIZE + 8, SIZE), dtype=np.float32))


@installed
def test_a_file_that_is_not_a_model_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "broken.tflite"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(MobileOneError, match=r"broken.tflite is not a LiteRT \(.tflite\) model"
                       ) as error:
        backend.open(path)
    assert error.value.exit_code == EXIT_BAD_INPUT


@installed
def test_other_options_are_refused(written: dict[str, tuple[Folded, Path]],
                                   tmp_path: Path) -> None:
    folded, _path = written["s0"]
    with pytest.raises(UsageError, match="takes LiteRTOptions"):
        backend.write(folded.model, tmp_path / "x.tflite", context=folded.context(options=1))


@installed
def test_a_converter_failure_quotes_its_last_meaningful_line(
        written: dict[str, tuple[Folded, Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import litert_torch

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("Lowering failed\nerror: 'tfl.conv_2d' op has mismatched shapes\n^^^^")

    monkeypatch.setattr(litert_torch, "convert", fail)
    folded, _path = written["s0"]
    with pytest.raises(MobileOneError) as error:
        backend.write(folded.model, tmp_path / "failed.tflite", context=folded.context())
    assert error.value.exit_code == EXIT_EXPORT_FAILED
    assert error.value.message == ("litert-torch's conversion failed: "
                                   "error: 'tfl.conv_2d' op has mismatched shapes")


@pytest.mark.parametrize("module", ["litert_torch", "ai_edge_litert.interpreter"])
def test_a_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch,
                                               module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    package = module.split(".")[0]
    assert backend.missing() == (f"the tflite target needs the '{package}' package: "
                                 'pip install "mobileone-cli[litert]"')

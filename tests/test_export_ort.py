"""The ORT-format backend: Apple's S0 and S4 proven in onnxruntime, its config, bytes and faults.

The ORT conversion itself takes a fraction of a second (at 64 px: the ONNX
export is most of the time). S0 and S4 are written here; S1-S3 and the other
layouts go through the public API in tests/test_on_device_layouts.py. About 15 s
of CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mobileone_cli.errors import EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, MobileOneError, UsageError
from mobileone_cli.export import onnx as onnx_backend
from mobileone_cli.export import ort as backend
from mobileone_cli.export.backend import SharedWork
from mobileone_cli.options import OnnxOptions
from tests.on_device import (
    SIZE,
    Folded,
    assert_tampering_is_caught,
    fold,
)

VARIANTS = ("s0", "s4")

pytestmark = pytest.mark.skipif(backend.missing() is not None,
                                reason=backend.missing() or "")


@pytest.fixture(scope="module")
def written(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Folded, Path]]:
    folder = tmp_path_factory.mktemp("ort")
    models = {}
    for variant in VARIANTS:
        folded = fold(make_checkpoint(variant), variant)
        path = folder / f"{variant}.ort"
        backend.write(folded.model, path, context=folded.context())
        models[variant] = (folded, path)
    return models


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_variants_are_proven_in_onnxruntime(written: dict[str, tuple[Folded, Path]],
                                                variant: str) -> None:
    folded, path = written[variant]
    candidate = backend.open(path)
    verification = folded.prove(candidate)
    assert verification.passed, verification
    assert folded.error_against_folded(candidate) <= verification.rtol
    assert verification.top1_agreement == 1.0


def test_declared_is_read_from_the_file(written: dict[str, tuple[Folded, Path]]) -> None:
    folded, path = written["s0"]
    declared = backend.open(path).declared
    assert declared.runtime.startswith("onnxruntime ")
    assert (declared.input_name, declared.input_shape) == ("image", (1, 3, SIZE, SIZE))
    assert declared.output_names == ("logits",)
    assert (declared.layout, declared.dtype, declared.precision) == ("NCHW", "float32", "fp32")
    details = declared.details
    assert details["format"] == "ORT"
    assert details["required_operators"] == ["ai.onnx;13;Gemm,ReduceMean",
                                             "com.microsoft;1;FusedConv"]
    assert details["required_operators_config"] == "s0.required_operators.config"
    assert details["metadata"]["mobileone.variant"] == "s0"
    assert details["metadata"]["mobileone.mean"] == "[0.485, 0.456, 0.406]"


def test_config_beside_the_file_names_it_and_the_operators(
        written: dict[str, tuple[Folded, Path]]) -> None:
    _folded, path = written["s4"]
    assert backend.companions(path) == (path.with_name("s4.required_operators.config"),)
    assert backend.companions(path)[0].read_text() == (
        "# Generated from model/s:\n"
        "# - s4.ort\n"
        "ai.onnx;11;Conv\n"  # the squeeze-excite convs: FusedConv takes no Sigmoid
        "ai.onnx;13;Gemm,ReduceMean\n"
        "ai.onnx;14;Mul,Relu\n"
        "com.microsoft;1;FusedConv\n"
    )


def test_rewrite_is_byte_identical(written: dict[str, tuple[Folded, Path]], tmp_path: Path
                                   ) -> None:
    folded, path = written["s0"]
    again = tmp_path / "s0.ort"
    backend.write(folded.model, again, context=folded.context())
    assert again.read_bytes() == path.read_bytes()
    assert backend.companions(again)[0].read_bytes() == backend.companions(path)[0].read_bytes()


def test_the_converters_varying_front_is_rebuilt_in_one_order(
        written: dict[str, tuple[Folded, Path]], tmp_path: Path) -> None:
    """onnxruntime lays out its type-string resolver in hash order (see `canonical_session`)."""
    import contextlib
    import io

    import onnxruntime
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    from mobileone_cli.export.onnx import export

    folded, path = written["s0"]
    source = tmp_path / "s0.onnx"
    export(folded.model, source, metadata={}, options=OnnxOptions(), input_size=SIZE)
    batch = folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array[:1]
    canonical = set()
    for _ in range(3):
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(source, output_dir=tmp_path,
                                       optimization_styles=[OptimizationStyle.Fixed])
        raw = source.with_suffix(".ort").read_bytes()
        rebuilt = backend.canonical_session(raw)
        assert backend.canonical_session(rebuilt) == rebuilt
        canonical.add(rebuilt)
        outputs = []
        for data in (raw, rebuilt):
            candidate = tmp_path / "candidate.ort"
            candidate.write_bytes(data)
            options = onnxruntime.SessionOptions()
            options.add_session_config_entry("session.load_model_format", "ORT")
            session = onnxruntime.InferenceSession(str(candidate), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {"image": batch})[0])
        assert np.array_equal(outputs[0], outputs[1])
    assert len(canonical) == 1


def test_nothing_is_printed(written: dict[str, tuple[Folded, Path]], tmp_path: Path,
                            capfd: pytest.CaptureFixture[str]) -> None:
    folded, _path = written["s0"]
    path = tmp_path / "quiet.ort"
    backend.write(folded.model, path, context=folded.context())
    backend.open(path)(folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array)
    assert capfd.readouterr() == ("", "")


def test_tampered_weights_give_wrong_outputs(written: dict[str, tuple[Folded, Path]],
                                             tmp_path: Path) -> None:
    folded, path = written["s0"]
    assert_tampering_is_caught(backend, path, folded, tmp_path)


def test_a_batch_runs_one_sample_at_a_time_and_other_sizes_are_refused(
        written: dict[str, tuple[Folded, Path]]) -> None:
    folded, path = written["s0"]
    candidate = backend.open(path)
    batch = folded.folded.reference.restricted_to(SIZE, SIZE).batches[0].array
    assert len(batch) == 2
    together = candidate(batch)
    assert np.array_equal(together[1:], candidate(batch[1:]))
    with pytest.raises(ValueError, match=rf"s0.ort takes input of shape 1 x 3 x {SIZE} x {SIZE}"):
        candidate(np.zeros((1, 3, SIZE + 8, SIZE), dtype=np.float32))


def test_an_onnx_file_or_garbage_is_not_an_ort_model(written: dict[str, tuple[Folded, Path]],
                                                     tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ort"
    garbage.write_bytes(b"\0" * 64)
    with pytest.raises(MobileOneError, match=r"garbage\.ort is not an ORT format model") as error:
        backend.open(garbage)
    assert error.value.exit_code == EXIT_BAD_INPUT
    _folded, path = written["s0"]
    truncated = tmp_path / "truncated.ort"
    truncated.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(MobileOneError, match=r"truncated\.ort is not a valid ORT format model"):
        backend.open(truncated)


def test_onnx_options_apply_and_others_are_refused(written: dict[str, tuple[Folded, Path]],
                                                   tmp_path: Path) -> None:
    folded, _path = written["s0"]
    path = tmp_path / "batch.ort"
    backend.write(folded.model, path,
                  context=folded.context(options=OnnxOptions(dynamic_batch=True)))
    candidate = backend.open(path)
    assert candidate.declared.input_shape == ("batch", 3, SIZE, SIZE)
    assert folded.prove(candidate).passed
    with pytest.raises(UsageError, match="takes OnnxOptions"):
        backend.write(folded.model, tmp_path / "x.ort", context=folded.context(options=1))


def test_a_converter_failure_quotes_its_last_meaningful_line(
        written: dict[str, tuple[Folded, Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.tools import convert_onnx_models_to_ort as converter

    def fail(*args: object, **kwargs: object) -> None:
        print("Converting optimized ONNX model")  # chatter, not the reason
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed\n  File \"x\"\n")

    monkeypatch.setattr(converter, "convert_onnx_models_to_ort", fail)
    folded, _path = written["s0"]
    with pytest.raises(MobileOneError) as error:
        backend.write(folded.model, tmp_path / "failed.ort", context=folded.context())
    assert error.value.exit_code == EXIT_EXPORT_FAILED
    assert error.value.message == ("onnxruntime's ORT format converter failed: "
                                   "[ONNXRuntimeError] : 1 : FAIL : Load model failed")


def test_a_missing_converter_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    reason = backend.missing()
    assert reason == "the ort target needs the 'onnxruntime' package: pip install onnxruntime"


def test_report_times_the_ort_file_in_its_own_runtime(
    written: dict[str, tuple[Folded, Path]],
) -> None:
    from mobileone_cli import api
    from mobileone_cli.errors import UsageError
    from mobileone_cli.options import ReportOptions

    _folded, path = written["s0"]
    report = api.report(ReportOptions(sources=(path,), size=(SIZE, SIZE), runs=2, warmup=1,
                                          threads=1))
    [row] = report.rows
    assert (row.kind, row.fused, row.file_bytes) == ("ort", None, path.stat().st_size)
    [latency] = row.latency
    assert (latency.runtime, latency.model) == ("onnxruntime", "ort") and latency.median_ms > 0
    with pytest.raises(UsageError, match="does not fit") as refused:
        api.report(ReportOptions(sources=(path,), size=(SIZE + 32, SIZE + 32), latency=False))
    assert refused.value.hint == f"pass --batch 1 --size {SIZE} {SIZE}"


def test_one_run_traces_the_onnx_once_for_both_targets(
        written: dict[str, tuple[Folded, Path]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    folded, alone = written["s0"]
    traces = []
    trace = onnx_backend._trace
    monkeypatch.setattr(onnx_backend, "_trace",
                        lambda *args, **kwargs: traces.append(1) or trace(*args, **kwargs))
    context = replace(folded.context(), shared=SharedWork())
    onnx_path, ort_path = tmp_path / "s0.onnx", tmp_path / "s0.ort"
    onnx_backend.write(folded.model, onnx_path, context=context)
    backend.write(folded.model, ort_path, context=context)
    assert len(traces) == 1
    # The same bytes as each target written on its own.
    assert ort_path.read_bytes() == alone.read_bytes()
    onnx_backend.write(folded.model, tmp_path / "alone.onnx", context=folded.context())
    assert onnx_path.read_bytes() == (tmp_path / "alone.onnx").read_bytes()
    assert len(traces) == 2
    # Another request (here: another opset) is its own export, never a reused one.
    backend.write(folded.model, tmp_path / "opset16.ort",
                  context=replace(context, options=OnnxOptions(opset=16)))
    assert len(traces) == 3

"""validation.py: the cheap checks run before the fold, as pure functions."""

from __future__ import annotations

import math

import pytest
import torch

from mobileone_cli.errors import (
    BadArtifactError,
    BadCheckpointError,
    UsageError,
    VerificationFailedError,
)
from mobileone_cli.validation import (
    check_coreml_target,
    check_fits_dtype,
    check_folded_finite,
    check_input_size,
    check_label_count,
    finite_number,
    parse_labels,
    reference_bytes,
)


def test_reference_bytes_is_the_stem_activation_at_float64() -> None:
    assert reference_bytes(224) == 3 * 2 * 64 * 112 * 112 * 8  # 38.5 MB
    assert reference_bytes(100000) > 7e12


def test_an_input_size_beyond_the_available_memory_says_why() -> None:
    assert check_input_size(224, available=10**9) == 224
    with pytest.raises(UsageError, match=r"--input-size 4000 needs at least 12\.3 GB for the "
                                         r"reference run \(3 x 2 x 64 x 2000 x 2000 float64 "
                                         r"activations\), and 1\.0 GB is available"):
        check_input_size(4000, available=10**9)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(value: float) -> None:
    with pytest.raises(UsageError, match="is not a finite number"):
        finite_number(value, option="--rtol")


def test_targets() -> None:
    assert check_coreml_target("macOS13") == "macOS13"
    with pytest.raises(UsageError, match="too old"):
        check_coreml_target("macOS11")
    with pytest.raises(UsageError, match="not a Core ML deployment target"):
        check_coreml_target("ios16")


def test_labels() -> None:
    assert parse_labels("\ufeffcat\n\n dog \r\nbird\n".encode(), source="l") == (
        "cat", "dog", "bird")
    with pytest.raises(BadArtifactError, match=r"repeats 'cat' 2 times \(and 1 more repeated labels\)"):
        parse_labels(b"cat\ncat\ndog\ndog\n", source="l")
    with pytest.raises(BadArtifactError, match="has 2 labels, the model has 3 classes"):
        check_label_count(("a", "b"), num_classes=3, source="l")
    with pytest.raises(UsageError, match="headless backbone"):
        check_label_count(("a",), num_classes=None, source="l")


def test_dtype_range_names_the_tensor_and_the_range() -> None:
    state = {"a": torch.tensor([1.0, -70000.0], dtype=torch.float64)}
    check_fits_dtype(state, "bfloat16")
    with pytest.raises(VerificationFailedError, match=r"'b.a' holds 70000, beyond float16's "
                                                       r"range of ±65504"):
        check_fits_dtype(state, "float16", name=lambda key: f"b.{key}")


def test_a_non_finite_fold_is_bad_input() -> None:
    with pytest.raises(BadCheckpointError, match="beyond float32's range"):
        check_folded_finite({"w": torch.tensor([1.0, math.inf])})

"""Verification has teeth: every injected fold bug makes it fail, and a correct fold passes."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from fixtures.generate import canonical_state, spec_of
from mobileone_cli import fold
from mobileone_cli.model import build_model
from mobileone_cli.proof.compare import AUTO_TOLERANCE, DEFAULT_RTOL, FLOOR_FACTOR, compare
from mobileone_cli.proof.compare import torch_runner as torch_candidate
from mobileone_cli.proof.inputs import default_inputs
from mobileone_cli.proof.reference import run_reference
from mobileone_cli.results import Verification
from tests.faults import FAULTS

# S0 exercises multi-branch depthwise blocks, S1 the single-branch dense ones.
VARIANTS = ("s0", "s1")
INPUT_SIZE = 96


def _verify(variant: str, fault: Callable[[], AbstractContextManager[None]] | None
            ) -> Verification:
    spec = spec_of(variant)
    state = canonical_state(variant)
    if fault is None:
        folded = fold.fold_state(spec, state)
    else:
        with fault():
            folded = fold.fold_state(spec, state)
    reference = run_reference(spec, state, default_inputs(INPUT_SIZE))
    return compare(reference, torch_candidate(build_model(spec.folded(), folded)), rtol=None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_correct_fold_passes_near_the_noise_floor(variant: str) -> None:
    verification = _verify(variant, None)
    assert verification.passed and verification.tolerance_rule == AUTO_TOLERANCE
    assert verification.floor_ratio is not None and verification.floor_ratio < 3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_injected_fault_fails_verification(variant: str, fault: str) -> None:
    verification = _verify(variant, FAULTS[fault])
    assert not verification.passed
    assert verification.max_rel_diff > 10 * verification.rtol


def test_default_tolerance_follows_the_floor_and_an_explicit_rtol_is_kept() -> None:
    spec, state = spec_of("s0", num_classes=10), canonical_state("s0", num_classes=10)
    reference = run_reference(spec, state, default_inputs(64))
    folded = torch_candidate(build_model(spec.folded(), fold.fold_state(spec, state)))
    automatic = compare(reference, folded, rtol=None)
    assert automatic.rtol == max(DEFAULT_RTOL, FLOOR_FACTOR * reference.noise_floor)
    explicit = compare(reference, folded, rtol=1e-9)
    assert (explicit.rtol, explicit.tolerance_rule, explicit.passed) == (1e-9, "--rtol", False)


def test_nan_output_fails_and_reports_no_infinite_number() -> None:
    spec = spec_of("s0", num_classes=10)
    state = canonical_state("s0", num_classes=10)
    reference = run_reference(spec, state, default_inputs(64))
    verification = compare(reference, lambda batch: torch.full((len(batch), 10), float("nan"))
                           .numpy(), rtol=DEFAULT_RTOL)
    assert not verification.passed
    assert verification.to_dict()["max_rel_diff"] is None

"""RepViT's fold rules have teeth: every injected bug fails verification; the true fold passes.

m0_9 exercises the new token mixer (with its trailing BatchNorm) and the distillation head;
m1 the legacy token mixer (a 1x1 conv-BN, no trailing BatchNorm).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from fixtures.generate import canonical_state, spec_of
from mobileone_cli import fold
from mobileone_cli.model import build_model
from mobileone_cli.proof.compare import AUTO_TOLERANCE, compare
from mobileone_cli.proof.compare import torch_runner as torch_candidate
from mobileone_cli.proof.inputs import default_inputs
from mobileone_cli.proof.reference import run_reference
from mobileone_cli.results import Verification
from tests.faults import LEGACY_REPVIT_FAULTS, REPVIT_FAULTS

INPUT_SIZE = 64


def _verify(variant: str, fault: Callable[[], AbstractContextManager[None]] | None
            ) -> Verification:
    spec, state = spec_of(variant), canonical_state(variant)
    if fault is None:
        folded = fold.fold_state(spec, state)
    else:
        with fault():
            folded = fold.fold_state(spec, state)
    reference = run_reference(spec, state, default_inputs(INPUT_SIZE))
    return compare(reference, torch_candidate(build_model(spec.folded(), folded)), rtol=None)


@pytest.mark.parametrize("variant", ["m0_9", "m1"])
def test_correct_fold_passes_near_the_noise_floor(variant: str) -> None:
    verification = _verify(variant, None)
    assert verification.passed and verification.tolerance_rule == AUTO_TOLERANCE
    assert verification.floor_ratio is not None and verification.floor_ratio < 3


@pytest.mark.parametrize(("variant", "fault"),
                         [("m0_9", name) for name in sorted(REPVIT_FAULTS)]
                         + [("m1", name) for name in sorted(LEGACY_REPVIT_FAULTS)])
def test_every_injected_fault_fails_verification(variant: str, fault: str) -> None:
    faults = REPVIT_FAULTS if variant == "m0_9" else LEGACY_REPVIT_FAULTS
    verification = _verify(variant, faults[fault])
    assert not verification.passed
    # Dropping eps moves outputs little where variances are large (RepViT's calibrated ones
    # are, after its residual sums): caught, but by a few times the tolerance, not ten.
    margin = 3 if fault == "ignore_eps" else 10
    assert verification.max_rel_diff > margin * verification.rtol


def test_token_mixer_rule_is_exact_on_a_tiny_block() -> None:
    """BN(conv-BN 3x3 + conv 1x1 + x) against the folded 3x3 conv, at float64."""
    torch.manual_seed(0)
    channels = 4
    state = {"conv.c.weight": torch.randn(channels, 1, 3, 3, dtype=torch.float64),
             "conv1.weight": torch.randn(channels, 1, 1, 1, dtype=torch.float64),
             "conv1.bias": torch.randn(channels, dtype=torch.float64)}
    for prefix in ("conv.bn.", "bn."):
        state.update({f"{prefix}weight": torch.rand(channels, dtype=torch.float64) + 0.5,
                      f"{prefix}bias": torch.randn(channels, dtype=torch.float64),
                      f"{prefix}running_mean": torch.randn(channels, dtype=torch.float64),
                      f"{prefix}running_var": torch.rand(channels, dtype=torch.float64) + 0.5})
    x = torch.randn(2, channels, 8, 8, dtype=torch.float64)

    def batchnorm(y: torch.Tensor, prefix: str) -> torch.Tensor:
        return torch.nn.functional.batch_norm(
            y, state[f"{prefix}running_mean"], state[f"{prefix}running_var"],
            state[f"{prefix}weight"], state[f"{prefix}bias"], eps=1e-5)

    branch = batchnorm(torch.nn.functional.conv2d(x, state["conv.c.weight"], padding=1,
                                                  groups=channels), "conv.bn.")
    branch1 = torch.nn.functional.conv2d(x, state["conv1.weight"], state["conv1.bias"],
                                         groups=channels)
    expected = batchnorm(branch + branch1 + x, "bn.")
    kernel, bias = fold.fold_token_mixer(state, "", channels=channels, legacy=False)
    folded = torch.nn.functional.conv2d(x, kernel, bias, padding=1, groups=channels)
    assert torch.allclose(folded, expected, rtol=0, atol=1e-12)


def test_norm_linear_rule_is_exact() -> None:
    torch.manual_seed(0)
    features, classes = 6, 3
    state = {"bn.weight": torch.rand(features, dtype=torch.float64) + 0.5,
             "bn.bias": torch.randn(features, dtype=torch.float64),
             "bn.running_mean": torch.randn(features, dtype=torch.float64),
             "bn.running_var": torch.rand(features, dtype=torch.float64) + 0.5,
             "l.weight": torch.randn(classes, features, dtype=torch.float64),
             "l.bias": torch.randn(classes, dtype=torch.float64)}
    x = torch.randn(5, features, dtype=torch.float64)
    normalised = torch.nn.functional.batch_norm(
        x, state["bn.running_mean"], state["bn.running_var"], state["bn.weight"],
        state["bn.bias"], eps=1e-5)
    expected = normalised @ state["l.weight"].T + state["l.bias"]
    weight, bias = fold.fold_norm_linear(state, "")
    assert torch.allclose(x @ weight.T + bias, expected, rtol=0, atol=1e-12)

"""The cost of a reduced precision: an artifact's outputs against the fp32 train-time model's.

A conversion proof asks "does the artifact compute what the same-precision
model computes?" and must be tight. This module answers the other question,
"how much does the precision change the answers?", on held-out inputs:
top-1 and top-5 agreement with the fp32 model, mean and worst cosine of each
sample's outputs, the largest error relative to the largest |output|, and
with labels the top-1 accuracy of both models and its change.

Pure numpy; the gates (`--min-agreement`, `--min-cosine`) compare these
figures with the defaults below, chosen from the measurements in the README.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# Chosen from the measurements in benchmarks/compression.py (README, "Compression"). On the
# trained digits every correct mode keeps top-1 agreement >= 0.89 and mean cosine >= 0.93
# (int8 weights of a folded MobileOne cost that much: 0.913 -> 0.837 top-1), while the
# deliberately broken quantizations (per-tensor int8 scales, a reversed palette) fall to
# agreement 0.13-0.6 and mean cosine 0.1-0.7. 0.8 sits between the two: below it the figures
# no longer describe the model. The real quality bar is the user's (`--min-agreement 0.99`).
DEFAULT_MIN_AGREEMENT = 0.8
DEFAULT_MIN_COSINE = 0.8


@dataclass(frozen=True)
class PrecisionCost:
    """How far a reduced-precision artifact's outputs are from the fp32 model's."""

    samples: int
    top1_agreement: float
    """Fraction of samples whose arg-max equals the fp32 model's."""
    top5_agreement: float
    """Fraction whose fp32 top-1 class is among the artifact's top 5 (1.0 with < 5 classes)."""
    mean_cosine: float
    worst_cosine: float
    max_relative_error: float
    """max |artifact - fp32| / max |fp32|."""
    reference_top1: float | None = None
    """Top-1 accuracy of the fp32 model against the labels; None without labels."""
    artifact_top1: float | None = None
    top1_delta: float | None = None
    """artifact_top1 - reference_top1 (negative: the artifact loses accuracy)."""

    def failures(self, *, min_agreement: float, min_cosine: float) -> list[str]:
        """One line per gate the figures miss; empty when both pass."""
        failed = []
        if self.top1_agreement < min_agreement:
            failed.append(f"top-1 agreement {self.top1_agreement:.3f} < --min-agreement "
                          f"{min_agreement:g}")
        # The mean, not the worst: one flipped sample of 539 takes the worst cosine of a correct
        # int8 digits model to -0.36, while the mean separates correct (0.94) from broken (0.11).
        if self.mean_cosine < min_cosine:
            failed.append(f"mean cosine {self.mean_cosine:.3f} < --min-cosine {min_cosine:g}")
        return failed

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe figures (a non-finite value becomes null)."""
        return {key: value if not isinstance(value, float) or math.isfinite(value) else None
                for key, value in asdict(self).items()}


def precision_cost(reference: np.ndarray, artifact: np.ndarray, *,
                   labels: np.ndarray | None = None) -> PrecisionCost:
    """Figures of `artifact` outputs (N x classes, or N x ...) against fp32 `reference` outputs.

    Both must come from the same inputs in the same order and be of the same
    kind (logits with logits, probabilities with probabilities). `labels`:
    int class index per sample, for accuracies.
    """
    import numpy as np

    expected = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    actual = np.asarray(artifact, dtype=np.float64).reshape(len(artifact), -1)
    if expected.shape != actual.shape:
        raise ValueError(f"artifact outputs {actual.shape} != reference outputs {expected.shape}")
    finite = bool(np.isfinite(actual).all())
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    cosines = np.nan_to_num((actual * expected).sum(axis=1) / np.maximum(norms, 1e-300), nan=-1.0)
    reference_top1 = expected.argmax(axis=1)
    artifact_top1 = actual.argmax(axis=1)
    top5 = np.argsort(-actual, axis=1)[:, :5]
    scale = float(np.abs(expected).max()) or 1.0
    error = float(np.abs(actual - expected).max()) / scale if finite else float("inf")
    figures: dict[str, Any] = {}
    if labels is not None:
        truth = np.asarray(labels).reshape(-1)
        if len(truth) != len(expected):
            raise ValueError(f"{len(truth)} labels for {len(expected)} samples")
        reference_accuracy = float(np.mean(reference_top1 == truth))
        artifact_accuracy = float(np.mean(artifact_top1 == truth))
        figures = {"reference_top1": reference_accuracy, "artifact_top1": artifact_accuracy,
                   "top1_delta": artifact_accuracy - reference_accuracy}
    return PrecisionCost(
        samples=len(expected),
        top1_agreement=float(np.mean(reference_top1 == artifact_top1)),
        top5_agreement=float(np.mean((top5 == reference_top1[:, None]).any(axis=1))),
        mean_cosine=float(cosines.mean()),
        worst_cosine=float(cosines.min()),
        max_relative_error=error,
        **figures,
    )

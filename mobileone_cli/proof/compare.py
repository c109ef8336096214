"""Measure a candidate against a reference, and the tolerance rules that judge the figures.

Two questions, kept apart for every artifact:

- The conversion proof (`compare`): does the artifact compute what the
  folded model computes? A full-precision artifact is measured against the
  train-time model. A reduced-precision one runs its stored weights with
  float32 arithmetic and is measured against the folded model with its
  weights rounded the same way (`with_rounded_weights`): both sides then hold
  the same numbers, so the fp32 noise-floor rule applies unchanged, and a
  tampered or mis-converted artifact fails however lossy its precision is.
- The cost of precision (`precision_cost`): what a reduced-precision artifact,
  run in its own arithmetic, gives up against the fp32 train-time model: top-1
  and top-5 agreement, mean and worst cosine. Gated by `--min-cosine` and
  `--min-agreement`; a failure names `--precision fp32`, never a bug.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from mobileone_cli.defaults import (
    AUTO_TOLERANCE,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_COSINE,
    DEFAULT_RTOL,
    FLOOR_FACTOR,
)
from mobileone_cli.results import PrecisionCost, Verification

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mobileone_cli.proof.inputs import InputBatch
    from mobileone_cli.proof.reference import ReferenceRun

Runner = Callable[["np.ndarray"], "np.ndarray"]

# The tolerance rule's constants and the default gates are in `defaults` (the CLI's --help
# shows them); why 1e-4 and 10x the floor is explained there.
TOP_K = 5


def torch_runner(model: torch.nn.Module) -> Runner:
    """A torch module as a candidate: float32 NCHW numpy in, numpy out."""
    import torch

    def run(array: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(array)).numpy()

    return run


def replayed(batches: Sequence[InputBatch], outputs: Sequence[np.ndarray]) -> Runner:
    """A candidate that gives back `outputs`, already computed on `batches` (the same arrays).

    For a candidate proven to compute exactly what the model that produced them computes
    (the same weights bit for bit, the same arithmetic): its outputs are those outputs, so
    running it again would only repeat the forward pass. Any other array is a ValueError.
    """
    recorded = [(batch.array, output) for batch, output in zip(batches, outputs, strict=True)]

    def run(array: np.ndarray) -> np.ndarray:
        for known, output in recorded:
            if known is array:
                return output
        raise ValueError("no output was recorded for this input")

    return run


def bit_identical(read: Mapping[str, torch.Tensor], verified: Mapping[str, torch.Tensor], *,
                  dtype: str) -> bool:
    """Whether `read` holds exactly `verified`'s keys, each tensor bit for bit `verified`'s
    (its floating-point tensors rounded to `dtype`, as a file of that dtype stores them).

    The bytes are compared in numpy, one thread, so a busy machine does not stall it.
    """
    import numpy as np
    import torch

    if read.keys() != verified.keys():
        return False
    stored = getattr(torch, dtype)
    for key, tensor in verified.items():
        expected = tensor.to(stored) if tensor.is_floating_point() else tensor
        actual = read[key]
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            return False
        if not np.array_equal(_raw_bytes(actual), _raw_bytes(expected)):
            return False
    return True


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a numpy array (any dtype, bfloat16 included); -0.0 is not 0.0."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def tolerance(reference: ReferenceRun, rtol: float | None) -> tuple[float, str]:
    """The user's --rtol exactly, or by default the larger of 1e-4 and 10x the noise floor."""
    if rtol is not None:
        return rtol, "--rtol"
    return max(DEFAULT_RTOL, FLOOR_FACTOR * reference.noise_floor), AUTO_TOLERANCE


def compare(reference: ReferenceRun, candidate: Runner, *, rtol: float | None) -> Verification:
    """Run `candidate` on every reference input and measure it against the fp32 outputs.

    `rtol=None` applies the default rule (see `tolerance`). Raises ValueError
    when the candidate's output shape differs from the reference's.
    """
    import numpy as np

    max_abs = 0.0
    cosines: list[float] = []
    agreements: list[bool] = []
    for _batch, expected, actual in _paired(reference, candidate):
        difference = np.abs(actual - expected)
        # NaN must not vanish in max(): a non-finite output is an infinite error.
        worst = float(difference.max()) if np.isfinite(difference).all() else float("inf")
        max_abs = max(max_abs, worst)
        cosines.extend(_cosines(actual, expected))
        if reference.is_classifier:
            agreements.extend(_top_k_agreement(actual, expected, k=1))
    floor = reference.noise_floor
    relative = max_abs / reference.scale
    applied, rule = tolerance(reference, rtol)
    return Verification(
        max_abs_diff=max_abs,
        max_rel_diff=relative,
        cosine_similarity=float(min(cosines)),
        top1_agreement=float(np.mean(agreements)) if agreements else None,
        noise_floor=floor,
        floor_ratio=relative / floor if floor > 0 else None,
        rtol=applied,
        tolerance_rule=rule,
        inputs=tuple(batch.description for batch in reference.batches),
        reference=reference.name,
    )


def precision_cost(reference: ReferenceRun, candidate: Runner, *, precision: str,
                   min_cosine: float = DEFAULT_MIN_COSINE,
                   min_agreement: float = DEFAULT_MIN_AGREEMENT,
                   labels: np.ndarray | None = None) -> PrecisionCost:
    """What `candidate`, run in its own `precision`, gives up against the fp32 reference.

    `labels`: the true class of each reference input (all batches in order), for
    the top-1 accuracy of both models.
    """
    pairs = _paired(reference, candidate)
    return cost_of([pair[1] for pair in pairs], [pair[2] for pair in pairs],
                   precision=precision, min_cosine=min_cosine, min_agreement=min_agreement,
                   is_classifier=reference.is_classifier, labels=labels)


def cost_of(expected: np.ndarray | list[np.ndarray], actual: np.ndarray | list[np.ndarray], *,
            precision: str, is_classifier: bool, min_cosine: float = DEFAULT_MIN_COSINE,
            min_agreement: float = DEFAULT_MIN_AGREEMENT,
            labels: np.ndarray | None = None) -> PrecisionCost:
    """The cost figures of `actual` outputs against fp32 `expected` ones (N x ..., same order).

    Lists hold batches whose per-sample sizes differ (a headless backbone at two
    input sizes); each is measured on its own and pooled.
    """
    import numpy as np

    expected_batches = expected if isinstance(expected, list) else [expected]
    actual_batches = actual if isinstance(actual, list) else [actual]
    cosines: list[float] = []
    top1: list[bool] = []
    top5: list[bool] = []
    max_abs, scale = 0.0, 0.0
    for wanted, got in zip(expected_batches, actual_batches, strict=True):
        wanted = np.asarray(wanted, dtype=np.float64).reshape(len(wanted), -1)
        got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
        if wanted.shape != got.shape:
            raise ValueError(f"candidate output {got.shape} != reference {wanted.shape}")
        difference = np.abs(got - wanted)
        max_abs = max(max_abs, float(difference.max()) if np.isfinite(difference).all()
                      else float("inf"))
        scale = max(scale, float(np.abs(wanted).max()))
        cosines.extend(_cosines(got, wanted))
        if is_classifier:
            top1.extend(_top_k_agreement(got, wanted, k=1))
            top5.extend(_top_k_agreement(got, wanted, k=TOP_K))
    accuracy: dict[str, float] = {}
    if labels is not None and is_classifier:
        truth = np.asarray(labels).reshape(-1)
        wanted = np.concatenate([np.asarray(b).reshape(len(b), -1) for b in expected_batches])
        got = np.concatenate([np.asarray(b).reshape(len(b), -1) for b in actual_batches])
        if len(truth) != len(wanted):
            raise ValueError(f"{len(truth)} labels for {len(wanted)} samples")
        accuracy = {"reference_top1": float(np.mean(wanted.argmax(axis=1) == truth)),
                    "artifact_top1": float(np.mean(got.argmax(axis=1) == truth))}
    return PrecisionCost(
        precision=precision,
        top1_agreement=float(np.mean(top1)) if top1 else None,
        top5_agreement=float(np.mean(top5)) if top5 else None,
        mean_cosine=float(np.mean(cosines)),
        worst_cosine=float(min(cosines)),
        max_rel_diff=max_abs / (scale or 1.0),
        min_cosine=min_cosine,
        min_agreement=min_agreement,
        samples=len(cosines),
        **accuracy,
    )


STORAGE_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
"""Reduced precisions (as artifacts declare them) and the torch dtype their weights are in."""


def with_rounded_weights(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A float32 copy of `model` whose floating-point weights are rounded to `dtype` and back.

    The module a reduced-precision file's stored weights make, evaluated with
    float32 arithmetic: what the file's full-precision evaluation must match.
    """
    import torch

    rounded = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for tensor in rounded.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(getattr(torch, dtype)).float())
    return rounded


def _paired(reference: ReferenceRun,
            candidate: Runner) -> list[tuple[InputBatch, np.ndarray, np.ndarray]]:
    """(batch, expected fp32 as float64, candidate output as float64) for every batch."""
    import numpy as np

    pairs: list[tuple[InputBatch, np.ndarray, np.ndarray]] = []
    for batch, expected in zip(reference.batches, reference.outputs_fp32, strict=True):
        actual = np.asarray(candidate(batch.array), dtype=np.float64)
        if actual.shape != expected.shape:
            raise ValueError(f"candidate output {actual.shape} != reference {expected.shape}")
        pairs.append((batch, expected.astype(np.float64), actual))
    return pairs


def _cosines(actual: np.ndarray, expected: np.ndarray) -> list[float]:
    """Cosine similarity of each sample's outputs; NaN (a non-finite output) counts as -1."""
    import numpy as np

    flat_actual = actual.reshape(len(actual), -1)
    flat_expected = expected.reshape(len(expected), -1)
    norms = np.linalg.norm(flat_actual, axis=1) * np.linalg.norm(flat_expected, axis=1)
    cosine = (flat_actual * flat_expected).sum(axis=1) / np.maximum(norms, 1e-300)
    return [float(value) for value in np.nan_to_num(cosine, nan=-1.0)]


def _top_k_agreement(actual: np.ndarray, expected: np.ndarray, *, k: int) -> list[bool]:
    """Whether each sample's reference top-1 class is among the candidate's top k."""
    import numpy as np

    flat_actual = actual.reshape(len(actual), -1)
    flat_expected = expected.reshape(len(expected), -1)
    k = min(k, flat_actual.shape[1])
    top = np.argsort(-flat_actual, axis=1)[:, :k]
    wanted = flat_expected.argmax(axis=1)
    return [bool(wanted[i] in top[i]) for i in range(len(top))]

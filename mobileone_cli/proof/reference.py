"""The train-time model's outputs on the verification inputs, computed once per run.

Why float64 too: a correct fold is not bit-exact, because fp32 convolutions
round differently once the branches are summed into one kernel. The error of
the fp32 train-time model against its own float64 evaluation (the *noise
floor*) is the size of that rounding, so a fold error of the same order as the
floor is correct, and one far above it is not.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mobileone_cli.model import build_model
from mobileone_cli.proof.inputs import InputBatch

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mobileone_cli.repvit import ModelSpec


@dataclass(frozen=True)
class ReferenceRun:
    """A model's outputs on the verification inputs, in fp32 and float64."""

    batches: tuple[InputBatch, ...]
    outputs_fp32: tuple[np.ndarray, ...]
    outputs_fp64: tuple[np.ndarray, ...]
    is_classifier: bool
    name: str = "train-time fp32"
    """What these outputs are of, for the reports."""

    @property
    def scale(self) -> float:
        """The largest |output| of the float64 reference, the denominator of relative errors."""
        return max(float(abs(out).max()) for out in self.outputs_fp64) or 1.0

    @property
    def noise_floor(self) -> float:
        """Relative error of the fp32 outputs against the float64 ones."""
        worst = max(
            float(abs(o32.astype("float64") - o64).max())
            for o32, o64 in zip(self.outputs_fp32, self.outputs_fp64, strict=True)
        )
        return worst / self.scale

    def restricted_to(self, height: int, width: int) -> ReferenceRun:
        """Only the batches of one input size, for artifacts with a static input shape."""
        keep = [i for i, batch in enumerate(self.batches) if batch.array.shape[2:] == (height, width)]
        if not keep:
            raise ValueError(f"no verification input is {height}x{width}")
        return replace(
            self,
            batches=tuple(self.batches[i] for i in keep),
            outputs_fp32=tuple(self.outputs_fp32[i] for i in keep),
            outputs_fp64=tuple(self.outputs_fp64[i] for i in keep),
        )

    def softmaxed(self) -> ReferenceRun:
        """The same run with soft-maxed outputs, to verify a classifier's probabilities.

        The fp32 outputs are soft-maxed in float32 and the float64 ones in float64,
        so the noise floor still measures fp32 rounding against exact arithmetic.
        """
        return replace(
            self,
            outputs_fp32=tuple(softmax(output) for output in self.outputs_fp32),
            outputs_fp64=tuple(softmax(output) for output in self.outputs_fp64),
            name=f"{self.name}, soft-maxed",
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1, in the dtype of `logits`."""
    import numpy as np

    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def run_module_reference(module: torch.nn.Module, batches: Sequence[InputBatch], *,
                         name: str, is_classifier: bool) -> ReferenceRun:
    """Run an eval-mode module in fp32 and, on a float64 copy, in float64."""
    import torch

    outputs: dict[torch.dtype, list[np.ndarray]] = {}
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(module).to(dtype).eval()
        with torch.inference_mode():
            outputs[dtype] = [
                model(torch.from_numpy(batch.array).to(dtype)).numpy() for batch in batches
            ]
        del model
    return ReferenceRun(batches=tuple(batches), outputs_fp32=tuple(outputs[torch.float32]),
                        outputs_fp64=tuple(outputs[torch.float64]), is_classifier=is_classifier,
                        name=name)


def run_reference(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    batches: Sequence[InputBatch],
    *,
    name: str = "train-time fp32",
) -> ReferenceRun:
    """Run the model of `spec` in eval mode (BatchNorm uses its running statistics)."""
    import torch

    outputs: dict[torch.dtype, list[np.ndarray]] = {}
    for dtype in (torch.float32, torch.float64):
        model = build_model(spec, state, dtype=dtype)
        with torch.inference_mode():
            outputs[dtype] = [
                model(torch.from_numpy(batch.array).to(dtype)).numpy() for batch in batches
            ]
        del model
    return ReferenceRun(
        batches=tuple(batches),
        outputs_fp32=tuple(outputs[torch.float32]),
        outputs_fp64=tuple(outputs[torch.float64]),
        is_classifier=spec.num_classes is not None,
        name=name,
    )

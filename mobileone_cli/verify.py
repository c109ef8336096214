"""Proof that a folded or exported model computes what the train-time model computes.

The train-time model is run once (`run_reference`) in fp32 and in float64;
every candidate (the folded torch model, an ONNX session, a Core ML program)
is then compared with the same figures by `compare`.

Why float64 too: a correct fold is not bit-exact, because fp32 convolutions
round differently once the branches are summed into one kernel. The error of
the fp32 train-time model against its own float64 evaluation (the *noise
floor*) is the size of that rounding, so a fold error of the same order as the
floor is correct, and one far above it is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import BadCheckpointError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mobileone_cli.variants import ArchitectureSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
INPUT_SEED = 0
# Measured at 160 px: a correct fold of the reference and synthetic checkpoints
# lands at 1.0-3.3e-5 (1.0-1.7x the fp32 noise floor); every injected fault in
# tests/faults.py at 2.9e-2 or more (over 1000x the floor). 1e-4 sits 3x above the
# one and 300x below the other. But the floor grows with depth and shrinks with
# input size (S4 at 32x96 px: 1.05e-4), so a fixed number cannot be right for
# every model: by default the tolerance is the larger of 1e-4 and 10x the floor.
DEFAULT_RTOL = 1e-4
FLOOR_FACTOR = 10.0
AUTO_TOLERANCE = f"max({DEFAULT_RTOL:g}, {FLOOR_FACTOR:g} x noise floor)"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Candidate = Callable[["np.ndarray"], "np.ndarray"]


@dataclass(frozen=True)
class InputBatch:
    description: str
    array: np.ndarray  # float32, N x 3 x H x W, normalised


@dataclass(frozen=True)
class ReferenceRun:
    """The train-time model's outputs on the verification inputs, in fp32 and float64."""

    batches: tuple[InputBatch, ...]
    outputs_fp32: tuple[np.ndarray, ...]
    outputs_fp64: tuple[np.ndarray, ...]
    is_classifier: bool

    @property
    def scale(self) -> float:
        """The largest |output| of the float64 reference, the denominator of relative errors."""
        return max(float(abs(out).max()) for out in self.outputs_fp64) or 1.0

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

    @property
    def noise_floor(self) -> float:
        """Relative error of the fp32 train-time model against its float64 evaluation."""
        worst = max(
            float(abs(o32.astype("float64") - o64).max())
            for o32, o64 in zip(self.outputs_fp32, self.outputs_fp64)
        )
        return worst / self.scale


@dataclass(frozen=True)
class Verification:
    """How closely a candidate reproduces the train-time fp32 model."""

    max_abs_diff: float
    max_rel_diff: float
    """max |candidate - train| / max |train|."""
    cosine_similarity: float
    """The lowest cosine similarity of any one sample's outputs."""
    top1_agreement: float | None
    """Fraction of samples whose arg-max class agrees; None for a headless backbone."""
    noise_floor: float
    floor_ratio: float | None
    """max_rel_diff / noise_floor: about 1 for a correct fold; None if the floor is 0."""
    rtol: float
    """The tolerance applied to max_rel_diff."""
    tolerance_rule: str
    """How `rtol` was chosen: AUTO_TOLERANCE, or "--rtol" when the user gave it."""
    inputs: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.max_rel_diff <= self.rtol

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe figures: an infinite error (non-finite output) becomes null."""
        figures = {key: (value if not isinstance(value, float) or math.isfinite(value) else None)
                   for key, value in asdict(self).items()}
        return {**figures, "inputs": list(self.inputs), "passed": self.passed}


def default_inputs(size: int = DEFAULT_INPUT_SIZE) -> tuple[InputBatch, ...]:
    """A fixed-seed batch at size x size plus one non-square image.

    Normal noise has the statistics of a normalised image; the non-square one
    proves the model holds no baked-in input size (squeeze-excite, pooling).
    """
    import torch

    generator = torch.Generator().manual_seed(INPUT_SEED)
    square = torch.randn(2, 3, size, size, generator=generator)
    # 192 x 256 at 224: proportional, so it stays a valid image at the smallest --input-size.
    height, width = size - size // 7, size + size // 7
    wide = torch.randn(1, 3, height, width, generator=generator)
    return (
        InputBatch(f"2x3x{size}x{size} normal(seed={INPUT_SEED})", square.numpy()),
        InputBatch(f"1x3x{height}x{width} normal(seed={INPUT_SEED})", wide.numpy()),
    )


def image_inputs(folder: Path, *, size: int = DEFAULT_INPUT_SIZE) -> tuple[InputBatch, ...]:
    """The user's images: shorter side resized to size/0.875, centre crop, ImageNet normalisation."""
    import numpy as np
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise BadCheckpointError(
            f"no images in {folder}", hint=f"--inputs takes a folder of {', '.join(IMAGE_SUFFIXES)}"
        )
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(_preprocess(image.convert("RGB"), size))
        except (OSError, Image.DecompressionBombError) as error:  # a bomb is no OSError
            raise BadCheckpointError(f"cannot read image {path.name}: {error}",
                                     hint="remove it from the --inputs folder") from None
    batch = np.stack(arrays).astype(np.float32)
    return (InputBatch(f"{len(paths)} images from {folder.name}/ at {size}x{size}", batch),)


def _preprocess(image: Any, size: int) -> np.ndarray:
    import numpy as np
    from PIL import Image

    resize_to = round(size / 0.875)
    width, height = image.size
    scale = resize_to / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                         Image.Resampling.BILINEAR)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    normalised = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return normalised.transpose(2, 0, 1)


def run_reference(
    spec: ArchitectureSpec, state: dict[str, torch.Tensor], batches: Sequence[InputBatch]
) -> ReferenceRun:
    """Run the train-time model (eval mode: BatchNorm uses its running statistics)."""
    import torch

    from mobileone_cli.model import build_model

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
    )


def per_sample(candidate: Candidate) -> Candidate:
    """Run a batch-1 artifact (static ONNX, Core ML) one image at a time."""
    import numpy as np

    def run(array: np.ndarray) -> np.ndarray:
        return np.concatenate([candidate(array[i : i + 1]) for i in range(len(array))])

    return run


def torch_candidate(model: torch.nn.Module) -> Candidate:
    import torch

    def run(array: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(array)).numpy()

    return run


def tolerance(reference: ReferenceRun, rtol: float | None) -> tuple[float, str]:
    """The user's --rtol exactly, or by default the larger of 1e-4 and 10x the noise floor."""
    if rtol is not None:
        return rtol, "--rtol"
    return max(DEFAULT_RTOL, FLOOR_FACTOR * reference.noise_floor), AUTO_TOLERANCE


def compare(reference: ReferenceRun, candidate: Candidate, *, rtol: float | None) -> Verification:
    """Run `candidate` on every reference input and measure it against the fp32 train-time model.

    `rtol=None` applies the default tolerance (see `tolerance`).
    """
    import numpy as np

    max_abs = 0.0
    cosines: list[float] = []
    agreements: list[bool] = []
    for batch, expected in zip(reference.batches, reference.outputs_fp32):
        actual = np.asarray(candidate(batch.array), dtype=np.float64)
        expected64 = expected.astype(np.float64)
        if actual.shape != expected.shape:
            raise ValueError(f"candidate output {actual.shape} != reference {expected.shape}")
        # NaN must not vanish in max(): a non-finite output is an infinite error.
        difference = np.abs(actual - expected64)
        worst = float(difference.max()) if np.isfinite(difference).all() else float("inf")
        max_abs = max(max_abs, worst)
        flat_actual = actual.reshape(len(actual), -1)
        flat_expected = expected64.reshape(len(expected64), -1)
        norms = np.linalg.norm(flat_actual, axis=1) * np.linalg.norm(flat_expected, axis=1)
        cosine = (flat_actual * flat_expected).sum(axis=1) / np.maximum(norms, 1e-300)
        cosines.extend(np.nan_to_num(cosine, nan=-1.0))
        if reference.is_classifier:
            agreements.extend(flat_actual.argmax(axis=1) == flat_expected.argmax(axis=1))
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
    )

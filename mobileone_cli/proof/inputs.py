"""The inputs every proof runs on: seeded noise by default, or the user's own images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.defaults import DEFAULT_INPUT_SIZE, IMAGE_SUFFIXES
from mobileone_cli.errors import BadArtifactError

if TYPE_CHECKING:
    import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SEED = 0
# ImageNet evaluation: resize the shorter side to size / 0.875, then centre-crop size x size.
CROP_FRACTION = 0.875


@dataclass(frozen=True)
class InputBatch:
    """One batch of normalised float32 N x 3 x H x W inputs, and how it was made."""

    description: str
    array: np.ndarray


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


def image_paths(folder: Path) -> list[Path]:
    """The images of a flat folder, or else of an ImageFolder tree's class folders, sorted."""
    flat = sorted(path for path in folder.iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if flat:
        return flat
    classes = sorted(path for path in folder.iterdir()
                     if path.is_dir() and not path.name.startswith("."))
    return sorted(path for class_folder in classes for path in class_folder.rglob("*")
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def image_inputs(folder: Path, *, size: int = DEFAULT_INPUT_SIZE) -> tuple[InputBatch, ...]:
    """The user's images (a folder or an ImageFolder tree): shorter side resized to
    size/0.875, centre crop, ImageNet normalisation."""
    import numpy as np
    from PIL import Image

    paths = image_paths(folder)
    if not paths:
        raise BadArtifactError(
            f"no images in {folder}", hint=f"--inputs takes a folder of {', '.join(IMAGE_SUFFIXES)}"
        )
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(preprocess(image.convert("RGB"), size))
        except (OSError, Image.DecompressionBombError) as error:
            raise BadArtifactError(f"cannot read image {path.name}: {error}",
                                   hint="remove it from the --inputs folder") from None
    batch = np.stack(arrays).astype(np.float32)
    return (InputBatch(f"{len(paths)} images from {folder.name}/ at {size}x{size}", batch),)


def preprocess(image: Any, size: int) -> np.ndarray:
    """One RGB PIL image as the normalised 3 x size x size float32 array the model takes."""
    import numpy as np
    from PIL import Image

    resize_to = round(size / CROP_FRACTION)
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

"""Image sets for compression: calibration images and labelled held-out images.

`--calibration DIR` and `--inputs DIR` take a folder of images or an
ImageFolder tree (one sub-folder per class, class index = position of the
folder name in sorted order, as torchvision's ImageFolder numbers them).
Images are prepared exactly as `verify.image_inputs` prepares them (shorter
side to size/0.875, centre crop, ImageNet mean/std), so a model sees here
what it sees in every other proof.

With a count, the images are picked evenly across the sorted file list (not
the first N, which in a tree would all be of the first class). The manifest
records the count and the sha256 of the chosen files (sorted relative paths
and their bytes), so a re-run can tell whether it calibrated on the same set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from mobileone_cli.errors import BadInputError, UsageError
from mobileone_cli.files import sha256_files
from mobileone_cli.proof.inputs import DEFAULT_INPUT_SIZE, IMAGE_SUFFIXES, image_paths, preprocess

if TYPE_CHECKING:
    import numpy as np

Picked = TypeVar("Picked")


@dataclass(frozen=True)
class ImageSet:
    """Prepared images, their files and, for an ImageFolder tree, their labels."""

    folder: Path
    files: tuple[Path, ...]
    array: np.ndarray
    """float32 N x 3 x size x size, normalised."""
    labels: np.ndarray | None
    """int64 class index per image (ImageFolder order); None for a flat folder."""
    classes: tuple[str, ...]
    """Sorted class folder names; empty for a flat folder."""
    sha256: str
    """Of the chosen files: sorted relative paths and contents."""

    @property
    def count(self) -> int:
        """How many images the set holds."""
        return len(self.files)

    def manifest(self) -> dict[str, object]:
        """What the manifest records about the set."""
        return {"folder": self.folder.name, "count": self.count, "sha256": self.sha256,
                "labelled": self.labels is not None}


def image_files(folder: Path, *, option: str = "--calibration") -> tuple[list[Path], list[str]]:
    """The image files of a flat folder or an ImageFolder tree, and the tree's class names."""
    if not folder.is_dir():
        raise BadInputError(f"{option} {folder} is not a folder",
                            hint=f"{option} takes a folder of images or an ImageFolder tree")
    files = image_paths(folder)
    if not files:
        raise BadInputError(
            f"no images in {folder}",
            hint=f"{option} takes a folder of {', '.join(IMAGE_SUFFIXES)} files "
            "or an ImageFolder tree (one sub-folder per class)")
    classes = sorted({path.relative_to(folder).parts[0] for path in files
                      if len(path.relative_to(folder).parts) > 1})
    return files, classes


def pick_evenly(items: Sequence[Picked], count: int) -> list[Picked]:
    """`count` items spread evenly over the sorted list (all of them when count == len)."""
    return [items[index * len(items) // count] for index in range(count)]


def load_images(
    folder: Path,
    *,
    size: int = DEFAULT_INPUT_SIZE,
    count: int | None = None,
    option: str = "--calibration",
) -> ImageSet:
    """Read and prepare the images of `folder` (all, or `count` of them).

    One-line errors: not a folder or no images (`BadInputError`), fewer images
    than `count` (`UsageError`, naming both numbers), an unreadable image
    (`BadInputError`, naming the file). `option` names the flag in messages.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    files, classes = image_files(folder, option=option)
    if count is not None:
        if count < 1:
            raise UsageError(f"{option}-count must be at least 1, got {count}")
        if count > len(files):
            raise UsageError(
                f"{option}-count {count} asks for more images than {folder} holds ({len(files)})",
                hint=f"pass {option}-count {len(files)} or add images")
        files = pick_evenly(files, count)
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                arrays.append(preprocess(image.convert("RGB"), size))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise BadInputError(
                f"cannot read image {path.relative_to(folder)}: {str(error).splitlines()[0]}",
                hint=f"remove it from the {option} folder") from None
    labels = (np.array([classes.index(path.relative_to(folder).parts[0]) for path in files],
                       dtype=np.int64) if classes else None)
    return ImageSet(folder=folder, files=tuple(files), array=np.stack(arrays).astype(np.float32),
                    labels=labels, classes=tuple(classes), sha256=sha256_files(folder, files))

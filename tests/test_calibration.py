"""mobileone_cli.calibration: image folders for calibration and held-out figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobileone_cli.calibration import load_images, pick_evenly
from mobileone_cli.errors import BadInputError, UsageError
from mobileone_cli.proof.inputs import image_inputs


def write_image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (value, 255 - value, value // 2)).save(path)
    return path


def test_a_flat_folder_is_prepared_like_verify_inputs(tmp_path: Path) -> None:
    for index in range(3):
        write_image(tmp_path / f"image{index}.png", 40 * index)
    images = load_images(tmp_path, size=32)
    expected = image_inputs(tmp_path, size=32)[0].array
    np.testing.assert_array_equal(images.array, expected)
    assert images.labels is None and images.classes == ()
    assert images.count == 3 and len(images.sha256) == 64


def test_an_imagefolder_tree_gives_labels_in_sorted_class_order(tmp_path: Path) -> None:
    for name, value in (("cat", 10), ("ant", 20), ("bee", 30)):
        for index in range(2):
            write_image(tmp_path / name / f"{index}.jpg", value + index)
    images = load_images(tmp_path, size=32)
    assert images.classes == ("ant", "bee", "cat")
    assert images.labels is not None
    assert list(images.labels) == [0, 0, 1, 1, 2, 2]


def test_a_count_picks_evenly_across_the_classes(tmp_path: Path) -> None:
    for label in range(3):
        for index in range(4):
            write_image(tmp_path / str(label) / f"{index}.png", label * 50 + index)
    images = load_images(tmp_path, size=32, count=3)
    assert images.labels is not None and list(images.labels) == [0, 1, 2]
    assert pick_evenly(list(range(10)), 10) == list(range(10))  # type: ignore[arg-type]


def test_the_sha256_follows_the_chosen_files_and_their_bytes(tmp_path: Path) -> None:
    for index in range(4):
        write_image(tmp_path / f"{index}.png", index)
    first = load_images(tmp_path, size=32).sha256
    assert load_images(tmp_path, size=32).sha256 == first
    assert load_images(tmp_path, size=32, count=2).sha256 != first
    write_image(tmp_path / "3.png", 200)
    assert load_images(tmp_path, size=32).sha256 != first


def test_an_empty_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(BadInputError, match=r"^no images in ") as caught:
        load_images(tmp_path)
    assert "\n" not in caught.value.message


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png", 1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match=r"^cannot read image broken.png") as caught:
        load_images(tmp_path, option="--calibration")
    assert "\n" not in caught.value.message
    assert caught.value.hint == "remove it from the --calibration folder"


def test_fewer_images_than_asked_names_both_numbers(tmp_path: Path) -> None:
    for index in range(2):
        write_image(tmp_path / f"{index}.png", index)
    with pytest.raises(UsageError, match=r"--calibration-count 5 asks for more images than .* \(2\)"):
        load_images(tmp_path, count=5)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="is not a folder"):
        load_images(tmp_path / "absent", option="--inputs")

"""fixtures/digits.py: a MobileOne trained on real digits, read back like any checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from fixtures.digits import CLASSES, IMAGE_SIZE, Digits, digits_spec
from mobileone_cli.calibration import load_images
from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.model import build_model


def test_the_checkpoint_is_inferred_as_a_custom_width_mobileone(digits: Digits) -> None:
    loaded = load_checkpoint(digits.checkpoint)
    assert loaded.spec == digits_spec()
    assert loaded.variant == "custom"
    assert loaded.layout == "apple"
    assert not loaded.is_folded
    assert [stage[-1].out_channels for stage in loaded.spec.stages] == [16, 32, 64, 128]
    assert sum(len(stage) for stage in loaded.spec.stages) == 42  # S0's 21 block pairs


def test_heldout_digits_are_an_imagefolder_tree_with_every_class(digits: Digits) -> None:
    heldout = load_images(digits.heldout, size=IMAGE_SIZE, option="--inputs")
    assert heldout.classes == tuple(str(label) for label in range(CLASSES))
    assert heldout.count == 539  # 30% of 1,797, per class
    assert heldout.labels is not None
    assert np.bincount(heldout.labels).min() >= 50
    calibration = load_images(digits.calibration, size=IMAGE_SIZE)
    assert calibration.labels is None
    assert not {path.name for path in calibration.files} & {p.name for p in heldout.files}


def test_the_trained_model_reads_digits_through_the_cli_preprocessing(digits: Digits) -> None:
    """The accuracy measured when training equals the one measured from the written files."""
    heldout = load_images(digits.heldout, size=IMAGE_SIZE, option="--inputs")
    loaded = load_checkpoint(digits.checkpoint)
    model = build_model(loaded.spec, loaded.state)
    with torch.inference_mode():
        predictions = model(torch.from_numpy(heldout.array)).argmax(dim=1).numpy()
    top1 = float(np.mean(predictions == heldout.labels))
    assert abs(top1 - digits.top1) < 1e-6  # same predictions (one digit is 1/539)
    assert top1 > 0.85  # measured 0.913 after 14 epochs

"""`export --quantize` on a full-size architecture: every mode of every target on a synthetic S0,
and the fp16 image-input case of a 37-class timm S4.

Synthetic weights give nearly tied logits, so top-1 agreement means little here (the trained
digits in test_quantize.py measure that); what must hold is the proof: every stored weight a
correct compression of the folded one, and the file computing with them what torch computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import run

pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters")
SIZE = 64
CALIBRATION_IMAGES = 20


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smooth random colour fields (not white noise: images have spatial structure)."""
    folder = tmp_path_factory.mktemp("calibration")
    generator = np.random.default_rng(0)
    for index in range(CALIBRATION_IMAGES):
        coarse = generator.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((SIZE + 16, SIZE + 16), Image.Resampling.BICUBIC)
        image.save(folder / f"image{index:02d}.png")
    return folder


@pytest.mark.parametrize(("target", "mode"), [
    ("onnx", "w8"), ("onnx", "w8a8"), ("onnx", "fp16"),
    ("coreml", "w8"), ("coreml", "pal8"), ("coreml", "pal6"), ("coreml", "pal4"),
    ("coreml", "w8a8"),
])
def test_every_mode_of_s0_passes_its_proof(target: str, mode: str, s0_checkpoint: Path,
                                           calibration: Path, tmp_path: Path) -> None:
    suffix = ".mlpackage" if target == "coreml" else ".onnx"
    output = tmp_path / f"s0{suffix}"
    code, stdout, stderr = run("export", s0_checkpoint, "--to", target, "-o", output,
                               "--input-size", SIZE, "--quantize", mode, "--calibration",
                               calibration, "--min-agreement", "0", "--min-cosine", "0", "--json")
    assert code == 0, stderr
    (artifact,) = json.loads(stdout)["artifacts"]
    proof, cost = artifact["verification"], artifact["cost"]
    assert proof["passed"] and proof["max_rel_diff"] < proof["rtol"], proof
    assert cost["samples"] == CALIBRATION_IMAGES // 5  # every 5th image held out
    assert cost["mean_cosine"] > 0.75, cost  # measured 0.81-1.00: the direction is kept
    if mode != "fp16":
        assert proof["weights"]["passed"] and proof["weights"]["layers"] > 0
    assert output.exists()


def test_fp16_image_input_37_class_timm_s4_passes_its_conversion_proof(
        make_checkpoint: object, tmp_path: Path) -> None:
    """The issue's case: once failed at 0.210 against a tolerance of 0.205, blamed on a bug."""
    assert callable(make_checkpoint)
    checkpoint = make_checkpoint("s4", "timm", num_classes=37)
    output = tmp_path / "s4.mlpackage"
    code, stdout, stderr = run("export", checkpoint, "--to", "coreml", "-o", output,
                               "--input-size", SIZE, "--image-input", "--json",
                               "--min-agreement", "0", "--min-cosine", "0")
    assert code == 0, stderr
    (artifact,) = json.loads(stdout)["artifacts"]
    proof, cost = artifact["verification"], artifact["cost"]
    assert proof["passed"] and proof["reference"] == "folded model with float16 weights"
    # Synthetic S4 logits nearly cancel, so its fp32 noise floor is large; the proof sits at
    # about that floor (the rule's 10x leaves room), far below what a tamper gives.
    assert proof["floor_ratio"] < 3, proof
    assert cost["precision"] == "fp16" and cost["top1_agreement"] is not None
    assert artifact["declared"]["details"]["image_input"] is True

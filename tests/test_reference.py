"""Against the peers' own code: Apple's ml-mobileone and timm folded these checkpoints.

The data is too large for the repository; it is found through MOBILEONE_REFERENCE
(default ../shared/reference) and these tests skip with a reason where it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobileone_cli import api
from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.fold import fold_state
from mobileone_cli.layouts import convert_key
from mobileone_cli.model import build_model
from mobileone_cli.options import ExportOptions, Gates

CHECKPOINTS = ("apple_s0", "apple_s4", "timm_s0")


@pytest.fixture(scope="module", params=CHECKPOINTS)
def folded(request: pytest.FixtureRequest, reference_dir: Path) -> tuple[str, object, dict]:
    name = request.param
    loaded = load_checkpoint(reference_dir / f"{name}_train.safetensors")
    return name, loaded, fold_state(loaded.spec, loaded.state)


def test_recognised_as_the_peer_says(folded: tuple, reference_dir: Path) -> None:
    name, loaded, _ = folded
    index = json.loads((reference_dir / "index.json").read_text())[name]
    assert (loaded.layout, loaded.variant) == (index["layout"], index["variant"])
    assert len(loaded.state) == index["train_keys"]


def test_our_fold_reproduces_the_peers_fused_logits(folded: tuple, reference_dir: Path) -> None:
    name, loaded, state = folded
    inputs = load_file(str(reference_dir / "inputs.safetensors"))
    logits = load_file(str(reference_dir / f"{name}_logits.safetensors"))
    model = build_model(loaded.spec.folded(), state)
    with torch.inference_mode():
        for size in ("x224", "x256x320"):
            ours = model(inputs[size])
            peer = logits[f"fused_{size}"]
            relative = float((ours - peer).abs().max() / peer.abs().max())
            assert relative <= 1e-4, (size, relative)
            assert torch.equal(ours.argmax(1), logits[f"train_{size}"].argmax(1))


def test_our_folded_tensors_match_the_peers_stats(folded: tuple, reference_dir: Path) -> None:
    name, loaded, state = folded
    stats = json.loads((reference_dir / f"{name}_fused_stats.json").read_text())
    ours = {convert_key(key, source="apple", target=loaded.layout): value
            for key, value in state.items()}
    assert ours.keys() == stats.keys()
    for key, value in ours.items():
        expected = stats[key]
        assert list(value.shape) == expected["shape"], key
        # The peers fold in fp32, we in float64: agreement to fp32 rounding of the sums.
        assert float(value.double().norm()) == pytest.approx(expected["l2"], rel=1e-5), key
        assert float(value.double().sum()) == pytest.approx(
            expected["sum"], rel=1e-4, abs=1e-5 * expected["l2"] * value.numel() ** 0.5), key


@pytest.mark.parametrize("name", ["apple_s0", "apple_s4"])
def test_reference_checkpoints_export_and_verify(name: str, reference_dir: Path,
                                                 tmp_path: Path) -> None:
    # 96 px: the size does not change the graph. The fp16 cost of these trained weights is
    # measured, not gated here (the gates are the CLI's defaults, tested elsewhere).
    result = api.export(ExportOptions(source=reference_dir / f"{name}_train.safetensors",
                                      targets=("onnx", "coreml"), output=tmp_path / "dist",
                                      input_size=96, gates=Gates(min_cosine=-1, min_agreement=0)))
    assert result.written, [a.verification for a in result.artifacts]
    assert {a.format for a in result.artifacts} == {"onnx", "coreml"}

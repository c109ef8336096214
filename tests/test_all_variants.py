"""Every variant in every layout: generated to the peers' manifests, loaded strictly,
folded, verified, and written with exactly the keys and shapes of the peer's fused model."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from fixtures.generate import manifest
from mobileone_cli import api
from mobileone_cli.layouts import LAYOUTS
from mobileone_cli.options import FoldOptions
from mobileone_cli.variants import VARIANTS


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_variant_in_layout_folds_to_the_peers_fused_model(
    make_checkpoint: object, tmp_path: Path, variant: str, layout: str
) -> None:
    checkpoint = make_checkpoint(variant, layout)  # type: ignore[operator]
    import torch

    train_shapes = {k: list(v.shape) for k, v in torch.load(checkpoint).items()}
    assert train_shapes == manifest(layout, variant, "train")

    output = tmp_path / "folded.safetensors"
    # Size does not matter for equivalence; 64 px keeps fifteen S0-S4 folds fast.
    result = api.fold(FoldOptions(checkpoint=checkpoint, output=output, input_size=64))
    assert (result.summary.layout, result.summary.variant) == (layout, variant)
    assert result.fold_verification.passed, result.fold_verification
    assert result.written
    with safe_open(str(output), framework="pt") as handle:
        written = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert written == manifest(layout, variant, "fused")

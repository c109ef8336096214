"""Variants as data, checked against the peers' own manifests."""

from __future__ import annotations

import pytest

from fixtures.generate import manifest, spec_of
from mobileone_cli.layouts import LAYOUTS, convert_key, parse_key
from mobileone_cli.model import expected_shapes
from mobileone_cli.variants import VARIANTS, identify_variant

VARIANT_NAMES = sorted(VARIANTS)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_and_fused_keys_equal_the_peer_manifest(variant: str, layout: str) -> None:
    spec = spec_of(variant)
    for kind, built in (("train", spec), ("fused", spec.folded())):
        ours = {convert_key(key, source="apple", target=layout): list(shape)
                for key, shape in expected_shapes(built).items()}
        assert ours == manifest(layout, variant, kind)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_each_variant_is_identified_train_time_and_folded(variant: str) -> None:
    spec = spec_of(variant, num_classes=10)
    assert identify_variant(spec) == variant
    assert identify_variant(spec.folded()) == variant


def test_s0_has_four_conv_branches_but_one_in_its_stem() -> None:
    spec = spec_of("s0")
    assert spec.stem.conv_branches == 1
    assert {block.conv_branches for stage in spec.stages for block in stage} == {4}


def test_s4_squeeze_excite_placement() -> None:
    spec = spec_of("s4")
    se_blocks = [sum(block.se_channels > 0 for block in stage) for stage in spec.stages]
    assert se_blocks == [0, 0, 10, 2]  # 5 and 1 (depthwise, pointwise) pairs


def test_a_changed_width_is_custom() -> None:
    spec = spec_of("s1")
    stem = spec.stem.__class__(**{**spec.stem.__dict__, "out_channels": 32})
    assert identify_variant(spec.__class__(stem, spec.stages, spec.num_classes)) == "custom"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_keys_of_other_models_do_not_parse(layout: str) -> None:
    for key in ("features.0.weight", "stage1.0.conv.weight", "stages.0.0.rbr_conv.0.conv.weight"
                if layout != "apple" else "stages.0.0.conv_kxk.0.conv.weight", "head.weight"):
        assert parse_key(key, layout) is None

"""Recognising checkpoints: layouts, wrappers, inferred architectures, look-alikes, problems."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.generate import canonical_state, state_in_layout
from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.errors import BadCheckpointError
from mobileone_cli.fold import fold_state
from mobileone_cli.synthetic import make_train_state
from mobileone_cli.variants import VARIANTS, VariantConfig, build_spec

LAYOUTS = ("apple", "timm", "mmpretrain")


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_recognised(tmp_path: Path, layout: str) -> None:
    path = _save(tmp_path / "c.pth", state_in_layout(canonical_state("s0"), layout))
    loaded = load_checkpoint(path)
    assert (loaded.layout, loaded.variant, loaded.spec.num_classes) == (layout, "s0", 1000)
    assert not loaded.is_folded


def test_custom_width_branches_and_classes_are_inferred(tmp_path: Path) -> None:
    config = VariantConfig("custom", (0.5, 0.75, 1.25, 1.5), conv_branches=2, se_blocks=(0, 0, 1, 1))
    spec = build_spec(config, num_classes=37)
    path = _save(tmp_path / "custom.pth", state_in_layout(make_train_state(spec), "timm"))
    loaded = load_checkpoint(path)
    assert loaded.spec == spec
    assert loaded.variant == "custom"


def test_a_different_number_of_classes_keeps_the_variant_name(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.pth", canonical_state("s0", num_classes=10))
    loaded = load_checkpoint(path)
    assert (loaded.variant, loaded.spec.num_classes) == ("s0", 10)


@pytest.mark.parametrize(
    ("name", "rename"),
    [
        ("segmentation encoder (apple keys under encoder.)", lambda k: f"encoder.{k}"),
        ("timm features_only", lambda k: k.replace("stages.", "stages_", 1)),
        ("mmdet/mmseg backbone", lambda k: k),
    ],
)
def test_headless_backbones_are_feature_extractors(tmp_path: Path, name: str, rename: object) -> None:
    layout = {"segmentation encoder (apple keys under encoder.)": "apple",
              "timm features_only": "timm", "mmdet/mmseg backbone": "mmpretrain"}[name]
    state = state_in_layout(canonical_state("s0", num_classes=None), layout)
    path = _save(tmp_path / "b.pth", {rename(k): v for k, v in state.items()})  # type: ignore[operator]
    loaded = load_checkpoint(path)
    assert loaded.is_headless and loaded.layout == layout and loaded.variant == "s0"


@pytest.mark.parametrize("variant", ["s0", "s1"])
def test_already_folded_checkpoints_are_recognised_by_shape(tmp_path: Path, variant: str) -> None:
    # Fused S0 and S1 have the same key count; only shapes tell them apart.
    spec = build_spec(VARIANTS[variant])
    folded = fold_state(spec, canonical_state(variant))
    path = _save(tmp_path / "f.pth", state_in_layout(folded, "timm"))
    loaded = load_checkpoint(path)
    assert loaded.is_folded and loaded.variant == variant


LOOK_ALIKES = {
    "timm FastViT": ({"stem.0.conv_kxk.0.conv.weight": (8, 3, 3, 3),
                      "stages.0.blocks.0.token_mixer.mixer.conv_kxk.0.conv.weight": (8, 1, 3, 3)},
                     "FastViT"),
    "Apple FastViT": ({"patch_embed.0.rbr_conv.0.conv.weight": (8, 3, 3, 3),
                       "network.0.0.token_mixer.mixer.rbr_skip.weight": (8,)}, "FastViT"),
    "six-stage package": ({"stage0.rbr_conv.0.conv.weight": (8, 3, 3, 3),
                           "stage5.0.rbr_conv.0.conv.weight": (8, 1, 3, 3)}, "six-stage"),
    "dw/pw re-implementation": ({"stage1.0.dw_conv.weight": (8, 1, 3, 3),
                                 "stage1.0.pw_bn.weight": (8,)}, "dw_*"),
}


@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_look_alikes_are_refused_by_name(tmp_path: Path, name: str) -> None:
    shapes, words = LOOK_ALIKES[name]
    path = _save(tmp_path / "x.pth", {k: torch.zeros(s) for k, s in shapes.items()})
    with pytest.raises(BadCheckpointError, match=words):
        load_checkpoint(path)


def test_an_unrelated_model_is_not_a_mobileone(tmp_path: Path) -> None:
    path = _save(tmp_path / "r.pth", {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(2)})
    with pytest.raises(BadCheckpointError, match=r"not a MobileOne checkpoint.*'conv1.weight'"):
        load_checkpoint(path)




PROBLEMS = {
    "missing keys (all, sorted)": (
        lambda s: [s.pop(k) for k in ("stages.1.3.identity.running_var", "head.fc.bias")],
        r"missing keys: head\.fc\.bias, stages\.1\.3\.identity\.running_var$"),
    "unexpected keys": (
        lambda s: s.update({"stages.0.0.extra.weight": torch.zeros(1)}),
        r"unexpected keys: stages\.0\.0\.extra\.weight"),
    "shape mismatch": (
        lambda s: s.update({"stages.0.0.conv_kxk.1.bn.weight": torch.ones(7)}),
        r"shape mismatch: 'stages\.0\.0\.conv_kxk\.1\.bn\.weight' is \(7,\), expected \(48,\)"),
    "non-finite values": (
        lambda s: s["stages.2.4.conv_kxk.0.conv.weight"].view(-1).__setitem__(0, float("nan")),
        r"'stages\.2\.4\.conv_kxk\.0\.conv\.weight' contains NaN or Inf"),
    "negative running variance": (
        lambda s: s.update({"stem.conv_scale.bn.running_var": -torch.ones(48)}),
        r"'stem\.conv_scale\.bn\.running_var' has negative running variances"),
    "integer weights": (
        lambda s: s.update({"head.fc.weight": torch.zeros(1000, 1024, dtype=torch.int8)}),
        r"'head\.fc\.weight' has dtype int8"),
}


@pytest.mark.parametrize("name", PROBLEMS)
def test_problems_are_found_before_any_work_and_name_the_key(tmp_path: Path, name: str) -> None:
    change, message = PROBLEMS[name]
    state = {k: v.clone() for k, v in state_in_layout(canonical_state("s0"), "timm").items()}
    change(state)
    path = _save(tmp_path / "broken.pth", state)
    with pytest.raises(BadCheckpointError, match=message):
        load_checkpoint(path)


def test_fp16_and_bf16_checkpoints_are_accepted(tmp_path: Path) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        state = {k: (v.to(dtype) if v.is_floating_point() else v)
                 for k, v in canonical_state("s0").items()}
        loaded = load_checkpoint(_save(tmp_path / f"{dtype}.pth", state))
        assert loaded.source_dtype == str(dtype).removeprefix("torch.")


# -- Found by the property in tests/test_robustness.py: each crashed, misread or printed
# -- more than one line before its fix.
def _stage0_kernels(size: int) -> dict[str, torch.Tensor]:
    """Every conv branch of timm S0's first depthwise block resized to size x size."""
    return {f"stages.0.0.conv_kxk.{branch}.conv.weight": torch.randn(48, 1, size, size)
            for branch in range(4)}


FOUND_PROBLEMS = {
    "outputs that do not split into the next block's groups": (
        lambda s: s.update({"stem.conv_kxk.0.conv.weight": torch.randn(49, 3, 3, 3)}),
        r"shape mismatch: 'stages\.0\.0\.' kernel \(48, 1, 3, 3\) does not fit 49 input"),
    "a 0-d classifier": (
        lambda s: s.update({"head.fc.weight": torch.tensor(1.0)}),
        r"'head\.fc\.weight' is \(\), expected one row per class"),
    "a classifier of no classes": (
        lambda s: s.update({"head.fc.weight": torch.zeros(0, 1024), "head.fc.bias": torch.zeros(0)}),
        r"'head\.fc\.weight' is \(0, 1024\), expected one row per class"),
    "even kernels in every branch of a block": (
        lambda s: s.update(_stage0_kernels(2)),
        r"'stages\.0\.0\.' kernel \(48, 1, 2, 2\) is not an odd k x k kernel"),
    "empty kernels in every branch of a block": (
        lambda s: s.update(_stage0_kernels(0)),
        r"'stages\.0\.0\.' kernel \(48, 1, 0, 0\) is not an odd k x k kernel"),
    "a 5-d kernel": (
        lambda s: s.update({"stem.conv_kxk.0.conv.weight": torch.zeros(48, 3, 3, 3, 1)}),
        r"shape mismatch: 'stem\.conv_kxk\.0\.conv\.weight' is \(48, 3, 3, 3, 1\), expected a 4-d"),
    "float8 weights": (
        lambda s: s.update({"head.fc.bias": s["head.fc.bias"].to(torch.float8_e4m3fn)}),
        (r"'head\.fc\.bias' has dtype float8_e4m3fn; weights must be float16, bfloat16, "
         r"float32 or float64$")),
    "a meta tensor": (
        lambda s: s.update({"head.fc.bias": s["head.fc.bias"].to("meta")}),
        r"'head\.fc\.bias' is a meta tensor \(no values\)"),
    "a sparse tensor": (
        lambda s: s.update({"head.fc.bias": s["head.fc.bias"].to_sparse()}),
        r"'head\.fc\.bias' is a sparse_coo tensor"),
    "one tensor under two namings": (
        lambda s: s.update({"stages_1.0.conv_kxk.0.bn.weight": torch.ones(48)}),
        (r"keys 'stages\.1\.0\.conv_kxk\.0\.bn\.weight' and "
         r"'stages_1\.0\.conv_kxk\.0\.bn\.weight' name the same tensor")),
    "a key with a line break": (
        lambda s: s.update({"extra\nkey\x1c": torch.zeros(1)}),
        r"unexpected keys: extra\\nkey\\x1c$"),
}


@pytest.mark.parametrize("name", FOUND_PROBLEMS)
def test_problems_found_by_the_property_are_one_line_refusals(tmp_path: Path, name: str) -> None:
    change, message = FOUND_PROBLEMS[name]
    state = {k: v.clone() for k, v in state_in_layout(canonical_state("s0"), "timm").items()}
    change(state)
    with pytest.raises(BadCheckpointError, match=message) as caught:
        load_checkpoint(_save(tmp_path / "broken.pth", state))
    assert len(caught.value.message.splitlines()) == 1


def test_a_block_index_with_a_leading_zero_cannot_shadow_the_real_block(tmp_path: Path) -> None:
    state = dict(canonical_state("s0"))
    state["stage1.00.rbr_conv.0.bn.weight"] = torch.ones(48)  # parses as block 0 too
    with pytest.raises(BadCheckpointError, match=r"'stage1.0.rbr_conv.0.bn.weight' and "
                                                 "'stage1.00.rbr_conv.0.bn.weight' name the same"):
        load_checkpoint(_save(tmp_path / "twice.pth", state))


def test_names_from_the_file_are_shown_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(BadCheckpointError, match=r"\(first keys: 'conv\\n1\.weight'\)") as caught:
        load_checkpoint(_save(tmp_path / "other.pth", {"conv\n1.weight": torch.zeros(1)}))
    assert "\n" not in caught.value.message
    with pytest.raises(BadCheckpointError, match=r"top-level keys: epoch\\r\\n") as caught:
        load_checkpoint(_save(tmp_path / "empty.pth", {"epoch\r\n": 3}))  # type: ignore[dict-item]
    assert "\n" not in caught.value.message


def test_a_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "s0.safetensors"
    for size in range(256):  # one header length in 256 has 0x80 as its first byte
        save_file(canonical_state("s0"), str(path), metadata={"pad": "x" * size})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_checkpoint(path).variant == "s0"

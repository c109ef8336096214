"""shoutOutYangJie's MobileOne-S0: recognised, unwrapped, folded, and written in three layouts.

Their S0 is Apple's S0 under other names, with two branches fewer (`yangjie_spec`); folded,
it has Apple's fused shapes, so it converts to Apple's and timm's fused layouts too. Their
own deploy model keeps the stem's BatchNorm, which ours folds: the default output writes
the folded stem as their conv and an identity BatchNorm, which their fused model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fixtures.generate import canonical_state, manifest, state_in_layout
from mobileone_cli import api
from mobileone_cli.checkpoint import load_checkpoint, output_layouts
from mobileone_cli.errors import BadCheckpointError
from mobileone_cli.fold import fold_state
from mobileone_cli.fold import state_in_layout as folded_in_layout
from mobileone_cli.model import build_model
from mobileone_cli.options import FoldOptions
from mobileone_cli.variants import VARIANTS, build_spec, identify_variant, yangjie_spec

REFERENCE_NAME = "yangjie_s0"


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> tuple[object, dict[str, torch.Tensor]]:
    loaded = load_checkpoint(reference_dir / f"{REFERENCE_NAME}_train.safetensors")
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in loaded.state.items()}  # stored fp16, exact in fp32
    return loaded, fold_state(loaded.spec, state)


def test_reference_is_recognised_as_yangjie_s0(reference: tuple, reference_dir: Path) -> None:
    loaded, _ = reference
    index = json.loads((reference_dir / "index.json").read_text())[REFERENCE_NAME]
    assert (loaded.layout, loaded.variant) == (index["layout"], index["variant"])
    assert len(loaded.state) == index["train_keys"]
    assert loaded.spec == yangjie_spec()


def test_our_fold_reproduces_their_fused_logits(reference: tuple, reference_dir: Path) -> None:
    loaded, state = reference
    inputs = load_file(str(reference_dir / "inputs.safetensors"))
    logits = load_file(str(reference_dir / f"{REFERENCE_NAME}_logits.safetensors"))
    with torch.inference_mode():
        ours = build_model(loaded.spec.folded(), state)(inputs["x224"])
    peer = logits["fused_x224"]
    assert float((ours - peer).abs().max() / peer.abs().max()) <= 1e-4
    assert torch.equal(ours.argmax(1), logits["train_x224"].argmax(1))


def test_our_fused_tensors_match_their_stats(reference: tuple, reference_dir: Path) -> None:
    loaded, state = reference
    stats = json.loads((reference_dir / f"{REFERENCE_NAME}_fused_stats.json").read_text())
    ours = folded_in_layout(state, layout="yangjie")
    assert [key for key in ours if not key.endswith("num_batches_tracked")] == list(stats)
    # Their deploy keeps the stem conv and BatchNorm unfolded: compare those with the source.
    source = {key: value.double() for key, value in
              load_file(str(reference_dir / f"{REFERENCE_NAME}_train.safetensors")).items()}
    for key, expected in stats.items():
        value = source[key] if key.startswith("stage0.") else ours[key].double()
        assert list(value.shape) == expected["shape"], key
        assert float(value.norm()) == pytest.approx(expected["l2"], rel=1e-5), key
        assert float(value.sum()) == pytest.approx(
            expected["sum"], rel=1e-4, abs=1e-5 * expected["l2"] * value.numel() ** 0.5), key


def test_stem_as_their_conv_and_identity_batchnorm_is_exact() -> None:
    spec = yangjie_spec(num_classes=10)
    folded = fold_state(spec, canonical_state("s0", num_classes=10, layout="yangjie"))
    theirs = folded_in_layout(folded, layout="yangjie")
    conv = torch.nn.Conv2d(3, 48, 3, 2, 1, bias=False)
    batchnorm = torch.nn.BatchNorm2d(48).eval()
    conv.load_state_dict({"weight": theirs["stage0.0.weight"]})
    batchnorm.load_state_dict({key.removeprefix("stage0.1."): value
                               for key, value in theirs.items() if key.startswith("stage0.1.")})
    x = torch.randn(2, 3, 32, 32)
    expected = torch.nn.functional.conv2d(x, folded["stage0.reparam_conv.weight"],
                                          folded["stage0.reparam_conv.bias"], stride=2, padding=1)
    with torch.inference_mode():
        assert torch.equal(batchnorm(conv(x)), expected)


def test_their_train_wrapper_is_unwrapped(tmp_path: Path) -> None:
    state = state_in_layout(canonical_state("s0", num_classes=10, layout="yangjie"), "yangjie")
    parameters = [torch.zeros(1)]
    optimizer = torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    path = tmp_path / "mobileone_s0_best.pth.tar"
    torch.save({"epoch": 3, "arch": "mobileone_s0",
                "state_dict": {f"module.{key}": value for key, value in state.items()},
                "best_acc1": torch.tensor([70.5]), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert (loaded.layout, loaded.variant, loaded.spec.num_classes) == ("yangjie", "s0", 10)
    assert loaded.container == "state_dict" and loaded.stripped_prefixes == ("module.",)


def test_a_yangjie_block_with_a_missing_branch_is_refused(tmp_path: Path) -> None:
    state = state_in_layout(canonical_state("s0", num_classes=10, layout="yangjie"), "yangjie")
    del state["stage2.3.pw_bn_layer.running_var"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(BadCheckpointError, match=r"missing keys: stage2\.3\.pw_bn_layer\.running_var"):
        load_checkpoint(path)


def test_folded_spec_is_apples_fused_s0() -> None:
    apple = build_spec(VARIANTS["s0"])
    assert yangjie_spec() != apple
    assert yangjie_spec().folded().structure() == apple.folded().structure()
    assert identify_variant(yangjie_spec()) == "s0"


@pytest.mark.parametrize("layout", [None, "apple", "timm"])
def test_fold_writes_the_fused_model_of_each_layout(make_checkpoint: object, tmp_path: Path,
                                                    layout: str | None) -> None:
    checkpoint = make_checkpoint("s0", "yangjie")  # type: ignore[operator]
    train = {key: list(value.shape) for key, value in torch.load(checkpoint).items()}
    assert train == manifest("yangjie", "s0", "train")
    output = tmp_path / "folded.safetensors"
    result = api.fold(FoldOptions(checkpoint=checkpoint, output=output, input_size=64,
                                         layout=layout))
    assert (result.summary.layout, result.summary.variant) == ("yangjie", "s0")
    assert result.fold_verification.passed and result.written, result.fold_verification
    with safe_open(str(output), framework="pt") as handle:
        written = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert written == manifest(layout or "yangjie", "s0", "fused")
    again = load_checkpoint(output)
    assert (again.layout, again.variant) == (layout or "yangjie", "s0")


def test_only_a_fused_s0_can_take_their_names() -> None:
    assert output_layouts(yangjie_spec()) == ("apple", "timm", "mmpretrain", "yangjie")
    assert output_layouts(build_spec(VARIANTS["s0"])) == ("apple", "timm", "mmpretrain", "yangjie")
    assert output_layouts(build_spec(VARIANTS["s1"])) == ("apple", "timm", "mmpretrain")


def test_a_partial_yangjie_file_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    state = state_in_layout(canonical_state("s0", num_classes=10, layout="yangjie"), "yangjie")
    kept = {key: value for key, value in state.items() if key.startswith("stage5.")}
    kept.update({f"other.{index}": torch.zeros(1) for index in range(len(kept) + 1)})
    path = tmp_path / "partial.pth"
    torch.save(kept, path)
    with pytest.raises(BadCheckpointError, match=r"most resembles a MobileOne checkpoint in the "
                                                 r"yangjie layout .*missing 'stage0\.\*'"):
        load_checkpoint(path)

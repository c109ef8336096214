"""The fold, block by block: each edge case on a tiny purpose-built block, in float64."""

from __future__ import annotations

import pytest
import torch

from mobileone_cli.fold import fold_state, fuse_conv_batchnorm, identity_kernel, pad_to_kernel_size
from mobileone_cli.model import FoldedBlock, MobileOne, TrainTimeBlock, build_model
from mobileone_cli.synthetic import make_train_state
from mobileone_cli.variants import VARIANTS, ArchitectureSpec, BlockSpec, build_spec


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.1)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))


def _block(**overrides: object) -> BlockSpec:
    fields: dict[str, object] = dict(in_channels=8, out_channels=8, kernel_size=3, stride=1,
                                     groups=8, conv_branches=3, has_scale=True, has_identity=True,
                                     se_channels=0)
    fields.update(overrides)
    return BlockSpec(**fields)  # type: ignore[arg-type]


BLOCKS = {
    "depthwise 3x3 with identity": _block(),
    "depthwise 3x3 stride 2": _block(stride=2, has_identity=False),
    "dense 1x1 with identity": _block(kernel_size=1, groups=1, has_scale=False),
    "dense 1x1 widening": _block(kernel_size=1, groups=1, out_channels=12, has_scale=False,
                                 has_identity=False),
    "grouped 3x3 (2 groups) with identity": _block(groups=2),
    "single branch with squeeze-excite": _block(conv_branches=1, se_channels=2),
    "stem-like 3->8 stride 2": _block(in_channels=3, groups=1, stride=2, has_identity=False,
                                      conv_branches=1),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_folded_block_computes_the_train_time_block(name: str) -> None:
    spec = BLOCKS[name]
    train = TrainTimeBlock(spec).double().eval()
    _randomise(train, seed=1)
    state = {f"stage0.{key}": value for key, value in train.state_dict().items()}
    stub = ArchitectureSpec(stem=spec, stages=(), num_classes=None)
    folded_state = fold_state(stub, state, dtype=torch.float64)
    folded = FoldedBlock(spec.folded()).double().eval()
    folded.load_state_dict({key.removeprefix("stage0."): value
                            for key, value in folded_state.items()})
    x = torch.randn(2, spec.in_channels, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), train(x), rtol=1e-12, atol=1e-12)


def test_fuse_conv_batchnorm_equals_conv_then_batchnorm() -> None:
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    norm = torch.nn.BatchNorm2d(6).double().eval()
    _randomise(norm, seed=2)
    state = {f"bn.{key}": value for key, value in norm.state_dict().items()}
    kernel, bias = fuse_conv_batchnorm(conv.weight.detach(), state, "bn.")
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = norm(conv(x))
    torch.testing.assert_close(torch.conv2d(x, kernel, bias, padding=1), expected)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_identity_kernel_is_the_identity(groups: int) -> None:
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    kernel = identity_kernel(8, groups=groups, kernel_size=3)
    assert torch.equal(torch.conv2d(x, kernel, padding=1, groups=groups), x)


def test_scale_kernel_is_padded_in_the_centre() -> None:
    padded = pad_to_kernel_size(torch.ones(1, 1, 1, 1), 3)
    assert padded[0, 0].tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_fold_is_pure_and_deterministic() -> None:
    spec = build_spec(VARIANTS["s0"], num_classes=10)
    state = make_train_state(spec, seed=3)
    before = {key: value.clone() for key, value in state.items()}
    first, second = fold_state(spec, state), fold_state(spec, state)
    assert all(torch.equal(state[key], before[key]) for key in state)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_whole_model_fold_in_float64_is_exact_to_rounding() -> None:
    spec = build_spec(VARIANTS["s4"], num_classes=10)
    state = make_train_state(spec, seed=4)
    train = build_model(spec, state, dtype=torch.float64)
    folded = build_model(spec.folded(), fold_state(spec, state, dtype=torch.float64),
                         dtype=torch.float64)
    x = torch.randn(1, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = train(x), folded(x)
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-10
    assert isinstance(folded, MobileOne) and all(
        not hasattr(block, "rbr_conv") for block in folded.modules() if isinstance(block, FoldedBlock))

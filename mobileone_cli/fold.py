"""Folding ("reparameterising") a train-time MobileOne into one conv per block.

Pure functions on canonical state dicts: nothing is mutated, no module surgery.
Every branch goes through the one conv-BN fusion (`fuse_conv_batchnorm`): the
identity branch is a BN after an identity kernel, the scale branch a BN after
a 1x1 kernel padded to k x k. Arithmetic is float64 and is cast once at the end,
so the fold adds no rounding beyond that single cast.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mobileone_cli.layouts import YANGJIE, convert_key
from mobileone_cli.model import BATCHNORM_EPS
from mobileone_cli.variants import ArchitectureSpec, BlockSpec

State = dict[str, torch.Tensor]
FOLD_DTYPE = torch.float64


def fuse_conv_batchnorm(
    kernel: torch.Tensor, state: State, prefix: str, *, eps: float = BATCHNORM_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of `conv(x, kernel)` followed by the BatchNorm at `prefix` (eval mode)."""
    gamma = state[f"{prefix}weight"].to(FOLD_DTYPE)
    beta = state[f"{prefix}bias"].to(FOLD_DTYPE)
    mean = state[f"{prefix}running_mean"].to(FOLD_DTYPE)
    variance = state[f"{prefix}running_var"].to(FOLD_DTYPE)
    scale = gamma / torch.sqrt(variance + eps)
    return kernel.to(FOLD_DTYPE) * scale.reshape(-1, 1, 1, 1), beta - mean * scale


def identity_kernel(channels: int, *, groups: int, kernel_size: int) -> torch.Tensor:
    """The k x k (grouped) conv kernel that maps x to x.

    Output channel i reads input channel i, which is position i % (channels / groups)
    within its group: 0 for a depthwise conv, i for a dense one.
    """
    kernel = torch.zeros(channels, channels // groups, kernel_size, kernel_size, dtype=FOLD_DTYPE)
    centre = kernel_size // 2
    for channel in range(channels):
        kernel[channel, channel % (channels // groups), centre, centre] = 1.0
    return kernel


def pad_to_kernel_size(kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad a 1x1 kernel to k x k; centred, because both convs use 'same' padding."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad, pad, pad, pad])


def fold_block(spec: BlockSpec, state: State, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 kernel and bias of one train-time block's summed branches."""
    parts = [
        fuse_conv_batchnorm(state[f"{prefix}rbr_conv.{i}.conv.weight"], state,
                            f"{prefix}rbr_conv.{i}.bn.")
        for i in range(spec.conv_branches)
    ]
    if spec.has_scale:
        scale_kernel = pad_to_kernel_size(state[f"{prefix}rbr_scale.conv.weight"], spec.kernel_size)
        parts.append(fuse_conv_batchnorm(scale_kernel, state, f"{prefix}rbr_scale.bn."))
    if spec.has_identity:
        kernel = identity_kernel(spec.in_channels, groups=spec.groups, kernel_size=spec.kernel_size)
        parts.append(fuse_conv_batchnorm(kernel, state, f"{prefix}rbr_skip."))
    kernel = torch.stack([k for k, _ in parts]).sum(dim=0)
    bias = torch.stack([b for _, b in parts]).sum(dim=0)
    return kernel, bias


def block_prefixes(spec: ArchitectureSpec) -> Iterator[tuple[BlockSpec, str]]:
    """Each block with its canonical key prefix, stem first."""
    yield spec.stem, "stage0."
    for stage_index, stage in enumerate(spec.stages, start=1):
        for block_index, block in enumerate(stage):
            yield block, f"stage{stage_index}.{block_index}."


def fold_state(
    spec: ArchitectureSpec, state: State, *, dtype: torch.dtype = torch.float32
) -> State:
    """The folded model's canonical state dict; `state` is left untouched.

    Already-folded blocks and the parts that folding does not touch
    (squeeze-excite, classifier) are copied through, cast to `dtype`.
    """
    folded: State = {}
    for block, prefix in block_prefixes(spec):
        if block.is_folded:
            kernel = state[f"{prefix}reparam_conv.weight"]
            bias = state[f"{prefix}reparam_conv.bias"]
        else:
            kernel, bias = fold_block(block, state, prefix)
        folded[f"{prefix}reparam_conv.weight"] = kernel.to(dtype)
        folded[f"{prefix}reparam_conv.bias"] = bias.to(dtype)
        if block.se_channels:
            for name in ("se.reduce.weight", "se.reduce.bias", "se.expand.weight", "se.expand.bias"):
                folded[f"{prefix}{name}"] = state[f"{prefix}{name}"].to(dtype)
    if spec.num_classes is not None:
        folded["linear.weight"] = state["linear.weight"].to(dtype)
        folded["linear.bias"] = state["linear.bias"].to(dtype)
    return {key: value.contiguous() for key, value in folded.items()}


def state_in_layout(state: State, *, layout: str) -> State:
    """A canonical MobileOne state dict under `layout`'s own key names.

    shoutOutYangJie's deploy model keeps its stem a plain conv and a BatchNorm,
    so a folded stem is written as that conv with an identity BatchNorm whose
    shift is the folded bias: mean 0, variance 1 - eps (so var + eps is exactly
    1.0 in fp32, measured), scale 1. Their fused model loads it strictly and
    computes the same numbers.
    """
    stem = "stage0.reparam_conv."
    renamed: State = {}
    for key, value in state.items():
        if layout == YANGJIE and key.startswith(stem):
            if key.endswith("weight"):
                renamed[convert_key("stage0.rbr_conv.0.conv.weight", source="apple",
                                    target=layout)] = value
            else:
                bn = {"weight": torch.ones_like(value), "bias": value,
                      "running_mean": torch.zeros_like(value),
                      "running_var": torch.full_like(value, 1.0 - BATCHNORM_EPS),
                      "num_batches_tracked": torch.tensor(0)}
                for leaf, tensor in bn.items():
                    renamed[convert_key(f"stage0.rbr_conv.0.bn.{leaf}", source="apple",
                                        target=layout)] = tensor
            continue
        renamed[convert_key(key, source="apple", target=layout)] = value
    return renamed

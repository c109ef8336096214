"""Folding ("reparameterising") a train-time MobileOne or RepViT into plain convs.

Pure functions on canonical state dicts: nothing is mutated, no module surgery.
Every branch goes through the one conv-BN fusion (`fuse_conv_batchnorm`): the
identity branch is a BN after an identity kernel, the scale branch a BN after
a 1x1 kernel padded to k x k. Arithmetic is float64 and is cast once at the end,
so the fold adds no rounding beyond that single cast.

RepViT's rules use the same fusion: a conv-BN; its RepVGG-style token mixer
(3x3 conv-BN + padded 1x1 conv + identity, then the trailing BatchNorm fused
into that sum, its bias included); the legacy mixer (1x1 conv-BN, no trailing
BN); a BatchNorm1d before a Linear (the BN as a 1x1 depthwise kernel of ones,
composed into the Linear); and the distillation head averaged into one Linear.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mobileone_cli.layouts import YANGJIE, convert_key, rename_repvit
from mobileone_cli.repvit import FUSED_HEAD, HEADS, KERNEL_SIZE, ModelSpec, RepVitSpec, units
from mobileone_cli.variants import BATCHNORM_EPS, ArchitectureSpec, BlockSpec

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
    rows = torch.arange(channels)
    kernel[rows, rows % (channels // groups), centre, centre] = 1.0  # one indexed write
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
    kernel, bias = sum_branches(parts)
    return kernel, bias


def sum_branches(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed kernels and biases of parallel branches, added in order.

    Added one after another rather than stacked and reduced: the same float64 sums
    (bit for bit on S0-S4 and RepViT m0_9), without a stacked copy of every branch (S4: 0.56 s
    -> 0.16 s on one thread).
    """
    (kernel, bias), *others = parts
    return sum((k for k, _ in others), start=kernel), sum((b for _, b in others), start=bias)


def block_prefixes(spec: ArchitectureSpec) -> Iterator[tuple[BlockSpec, str]]:
    """Each block with its canonical key prefix, stem first."""
    yield spec.stem, "stage0."
    for stage_index, stage in enumerate(spec.stages, start=1):
        for block_index, block in enumerate(stage):
            yield block, f"stage{stage_index}.{block_index}."


def fold_state(
    spec: ModelSpec,
    state: State,
    *,
    dtype: torch.dtype = torch.float32,
    keep_distillation_head: bool = False,
) -> State:
    """The folded model's canonical state dict; `state` is left untouched.

    Already-folded blocks and the parts that folding does not touch
    (squeeze-excite, classifier) are copied through, cast to `dtype`. A RepViT's
    two classifiers become one unless `keep_distillation_head`; the result then
    fits `spec.folded(keep_distillation_head=True)`.
    """
    if isinstance(spec, RepVitSpec):
        return fold_repvit_state(spec, state, dtype=dtype,
                                 keep_distillation_head=keep_distillation_head)
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


def fuse_batchnorm_after(kernel: torch.Tensor, bias: torch.Tensor, state: State, prefix: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of `conv(x, kernel) + bias` followed by the BatchNorm at `prefix`.

    The BN scales the bias too: the bias goes through the same fusion as a
    (C, 1, 1, 1) kernel, and the BN's own shift is added once.
    """
    folded_kernel, shift = fuse_conv_batchnorm(kernel, state, prefix)
    scaled_bias, _ = fuse_conv_batchnorm(bias.to(FOLD_DTYPE).reshape(-1, 1, 1, 1), state, prefix)
    return folded_kernel, scaled_bias.reshape(-1) + shift


def fold_conv_norm(state: State, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A RepViT conv-BN (`c`, `bn`) as one biased conv."""
    return fuse_conv_batchnorm(state[f"{prefix}c.weight"], state, f"{prefix}bn.")


def fold_token_mixer(state: State, prefix: str, *, channels: int, legacy: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """RepViT's depthwise token mixer as one 3x3 depthwise conv.

    BN(conv-BN 3x3 (x) + conv 1x1 (x) + x); legacy: conv-BN 3x3 + conv-BN 1x1 + x.
    """
    parts = [fold_conv_norm(state, f"{prefix}conv.")]
    if legacy:
        kernel, bias = fuse_conv_batchnorm(state[f"{prefix}conv1.c.weight"], state,
                                           f"{prefix}conv1.bn.")
        parts.append((pad_to_kernel_size(kernel, KERNEL_SIZE), bias))
    else:
        kernel = state[f"{prefix}conv1.weight"].to(FOLD_DTYPE)
        parts.append((pad_to_kernel_size(kernel, KERNEL_SIZE),
                      state[f"{prefix}conv1.bias"].to(FOLD_DTYPE)))
    parts.append((identity_kernel(channels, groups=channels, kernel_size=KERNEL_SIZE),
                  torch.zeros(channels, dtype=FOLD_DTYPE)))
    kernel, bias = sum_branches(parts)
    if legacy:
        return kernel, bias
    return fuse_batchnorm_after(kernel, bias, state, f"{prefix}bn.")


def fold_norm_linear(state: State, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm1d (`bn`) then Linear (`l`) as one Linear.

    The BN is an affine map per feature: a (C, 1, 1, 1) kernel of ones through the
    conv-BN fusion gives its scale and shift, which compose into the Linear's input.
    """
    weight = state[f"{prefix}l.weight"].to(FOLD_DTYPE)
    ones = torch.ones(weight.shape[1], 1, 1, 1, dtype=FOLD_DTYPE)
    scale, shift = fuse_conv_batchnorm(ones, state, f"{prefix}bn.")
    return (weight * scale.reshape(1, -1),
            weight @ shift + state[f"{prefix}l.bias"].to(FOLD_DTYPE))


def average_heads(heads: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Linear computing the mean of several Linears' outputs (linear, so exact)."""
    weight = torch.stack([w for w, _ in heads]).mean(dim=0)
    bias = torch.stack([b for _, b in heads]).mean(dim=0)
    return weight, bias


def fold_repvit_state(spec: RepVitSpec, state: State, *, dtype: torch.dtype = torch.float32,
                      keep_distillation_head: bool = False) -> State:
    """A RepViT's folded canonical (timm) state dict; see `fold_state`."""
    if spec.is_folded:
        return {key: value.to(dtype).contiguous() for key, value in state.items()}
    folded: State = {}
    for unit in units(spec):
        if unit.kind == "se":
            for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                folded[f"{unit.prefix}{name}"] = state[f"{unit.prefix}{name}"].to(dtype)
            continue
        if unit.kind == "mixer":
            assert unit.block is not None
            kernel, bias = fold_token_mixer(state, unit.prefix, channels=unit.block.channels,
                                            legacy=spec.legacy)
        else:
            kernel, bias = fold_conv_norm(state, unit.prefix)
        folded[f"{unit.prefix}weight"] = kernel.to(dtype)
        folded[f"{unit.prefix}bias"] = bias.to(dtype)
    if spec.num_classes is not None:
        heads = [fold_norm_linear(state, prefix) for prefix in HEADS[: 1 + spec.distillation]]
        if spec.distillation and keep_distillation_head:
            named = zip(HEADS, heads, strict=False)
        else:
            named = zip((FUSED_HEAD,), [average_heads(heads)], strict=True)
        for prefix, (weight, bias) in named:
            folded[f"{prefix}weight"] = weight.to(dtype)
            folded[f"{prefix}bias"] = bias.to(dtype)
    return {key: value.contiguous() for key, value in folded.items()}


def state_in_layout(state: State, *, layout: str, family: str = "mobileone") -> State:
    """A canonical state dict of a model of `family` under `layout`'s own key names.

    KeyError when `layout` cannot name it (a layout of another family, SE in yangjie).

    shoutOutYangJie's deploy model keeps its stem a plain conv and a BatchNorm,
    so a folded stem is written as that conv with an identity BatchNorm whose
    shift is the folded bias: mean 0, variance 1 - eps (so var + eps is exactly
    1.0 in fp32, measured), scale 1. Their fused model loads it strictly and
    computes the same numbers.
    """
    if family == "repvit":
        names = rename_repvit(list(state), source="timm", target=layout)
        missing = [key for key, name in names.items() if name is None]
        if missing:
            raise KeyError(missing[0])
        return {str(names[key]): value for key, value in state.items()}
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

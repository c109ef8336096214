"""Injected fold bugs, each a realistic mistake a fold implementation makes.

`FAULTS` break MobileOne's rules; `REPVIT_FAULTS` RepViT's (some shared helpers, such as
the 1x1 padding, break both).

Each fault is a context manager that patches one piece of `mobileone_cli.fold`;
tests prove verification fails under every one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from mobileone_cli import fold


@contextmanager
def _patched(name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fold, name, replacement)
        yield


@contextmanager
def drop_scale_branch() -> Iterator[None]:
    """The 1x1 scale branch is forgotten in every block."""
    original = fold.fuse_conv_batchnorm

    def fuse(kernel: torch.Tensor, state: fold.State, prefix: str, **kw: Any) -> Any:
        result_kernel, bias = original(kernel, state, prefix, **kw)
        if prefix.endswith("rbr_scale.bn."):
            return torch.zeros_like(result_kernel), torch.zeros_like(bias)
        return result_kernel, bias

    with _patched("fuse_conv_batchnorm", fuse):
        yield


@contextmanager
def ignore_eps() -> Iterator[None]:
    """BatchNorm fused with 1/sqrt(var) instead of 1/sqrt(var + eps)."""
    original = fold.fuse_conv_batchnorm

    def fuse(kernel: torch.Tensor, state: fold.State, prefix: str, **kw: Any) -> Any:
        return original(kernel, state, prefix, eps=0.0)

    with _patched("fuse_conv_batchnorm", fuse):
        yield


@contextmanager
def pad_scale_in_corner() -> Iterator[None]:
    """The 1x1 kernel padded on one side only, so it lands in a corner of the k x k kernel."""

    def pad(kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
        extra = kernel_size - kernel.shape[-1]
        return torch.nn.functional.pad(kernel, [0, extra, 0, extra])

    with _patched("pad_to_kernel_size", pad):
        yield


@contextmanager
def identity_in_first_group_position() -> Iterator[None]:
    """Identity kernel always at input position 0: right for depthwise, wrong for dense."""

    def identity(channels: int, *, groups: int, kernel_size: int) -> torch.Tensor:
        kernel = torch.zeros(channels, channels // groups, kernel_size, kernel_size,
                             dtype=fold.FOLD_DTYPE)
        kernel[:, 0, kernel_size // 2, kernel_size // 2] = 1.0
        return kernel

    with _patched("identity_kernel", identity):
        yield


@contextmanager
def last_block_unfolded() -> Iterator[None]:
    """The last block keeps only its first conv's raw kernel, as if its fold was skipped."""
    original = fold.fold_state

    def fold_state(spec: Any, state: fold.State, **kw: Any) -> fold.State:
        folded = original(spec, state, **kw)
        *_, (block, prefix) = fold.block_prefixes(spec)
        kernel = state[f"{prefix}rbr_conv.0.conv.weight"].to(torch.float32)
        folded[f"{prefix}reparam_conv.weight"] = kernel
        folded[f"{prefix}reparam_conv.bias"] = torch.zeros(kernel.shape[0])
        return folded

    with _patched("fold_state", fold_state):
        yield


FAULTS = {
    "drop_scale_branch": drop_scale_branch,
    "ignore_eps": ignore_eps,
    "pad_scale_in_corner": pad_scale_in_corner,
    "identity_in_first_group_position": identity_in_first_group_position,
    "last_block_unfolded": last_block_unfolded,
}


@contextmanager
def mixer_without_identity() -> Iterator[None]:
    """The token mixer's identity branch is forgotten (a zero identity kernel)."""

    def identity(channels: int, *, groups: int, kernel_size: int) -> torch.Tensor:
        return torch.zeros(channels, channels // groups, kernel_size, kernel_size,
                           dtype=fold.FOLD_DTYPE)

    with _patched("identity_kernel", identity):
        yield


@contextmanager
def trailing_batchnorm_leaves_bias_unscaled() -> Iterator[None]:
    """The BN after the token mixer's sum scales the kernel but adds the bias as it was."""
    original = fold.fuse_conv_batchnorm

    def fuse_after(kernel: torch.Tensor, bias: torch.Tensor, state: fold.State, prefix: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        folded_kernel, shift = original(kernel, state, prefix)
        return folded_kernel, bias.to(fold.FOLD_DTYPE) + shift

    with _patched("fuse_batchnorm_after", fuse_after):
        yield


@contextmanager
def trailing_batchnorm_skipped() -> Iterator[None]:
    """The BN after the token mixer's sum is dropped, as a BN without `fuse()` would be."""

    def fuse_after(kernel: torch.Tensor, bias: torch.Tensor, state: fold.State, prefix: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel, bias

    with _patched("fuse_batchnorm_after", fuse_after):
        yield


@contextmanager
def legacy_conv1_batchnorm_ignored() -> Iterator[None]:
    """Legacy token mixer: the 1x1 conv's BN is forgotten (the kernel taken raw)."""
    original = fold.fuse_conv_batchnorm

    def fuse(kernel: torch.Tensor, state: fold.State, prefix: str, **kw: Any) -> Any:
        if prefix.endswith("token_mixer.conv1.bn."):
            return kernel.to(fold.FOLD_DTYPE), torch.zeros(kernel.shape[0], dtype=fold.FOLD_DTYPE)
        return original(kernel, state, prefix, **kw)

    with _patched("fuse_conv_batchnorm", fuse):
        yield


@contextmanager
def norm_linear_shift_dropped() -> Iterator[None]:
    """BatchNorm1d-Linear: the BN's scale is folded, its shift (through the weights) is not."""
    original = fold.fold_norm_linear

    def fold_norm_linear(state: fold.State, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight, _ = original(state, prefix)
        return weight, state[f"{prefix}l.bias"].to(fold.FOLD_DTYPE)

    with _patched("fold_norm_linear", fold_norm_linear):
        yield


@contextmanager
def distillation_head_dropped() -> Iterator[None]:
    """Only the first classifier is kept instead of the mean of the two."""

    def average_heads(heads: list[tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        return heads[0]

    with _patched("average_heads", average_heads):
        yield


REPVIT_FAULTS = {
    "mixer_without_identity": mixer_without_identity,
    "trailing_batchnorm_leaves_bias_unscaled": trailing_batchnorm_leaves_bias_unscaled,
    "trailing_batchnorm_skipped": trailing_batchnorm_skipped,
    "norm_linear_shift_dropped": norm_linear_shift_dropped,
    "distillation_head_dropped": distillation_head_dropped,
    "ignore_eps": ignore_eps,
    "conv1_padded_in_corner": pad_scale_in_corner,
}
LEGACY_REPVIT_FAULTS = {
    "legacy_conv1_batchnorm_ignored": legacy_conv1_batchnorm_ignored,
    "mixer_without_identity": mixer_without_identity,
    "conv1_padded_in_corner": pad_scale_in_corner,
}

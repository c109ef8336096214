"""Train-time and folded MobileOne modules built from an `ArchitectureSpec`.

State-dict keys are the canonical (Apple) names, so `layouts` can rename them
to any peer's layout. Two choices differ from Apple's code on purpose:
squeeze-excite pools with a global mean (Apple's bakes the input size into an
`avg_pool2d` kernel), and the head pools with `mean` instead of
`x.view(x.size(0), -1)`, a size-derived reshape that coremltools 9 with numpy
2.4 fails to convert. Both keep every export free of a fixed input size.
"""

from __future__ import annotations

import torch
from torch import nn

from mobileone_cli.repvit import ModelSpec
from mobileone_cli.repvit_model import RepVit
from mobileone_cli.variants import BATCHNORM_EPS, ArchitectureSpec, BlockSpec

__all__ = ["BATCHNORM_EPS", "MobileOne", "build_model", "build_shapes_only", "expected_shapes"]


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, bottleneck, kernel_size=1, bias=True)
        self.expand = nn.Conv2d(bottleneck, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(squeezed))))
        return x * gate


class ConvBatchNorm(nn.Sequential):
    def __init__(self, spec: BlockSpec, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            spec.in_channels,
            spec.out_channels,
            kernel_size=kernel_size,
            stride=spec.stride,
            padding=kernel_size // 2,
            groups=spec.groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(spec.out_channels, eps=BATCHNORM_EPS)


class TrainTimeBlock(nn.Module):
    """k conv-BN branches + 1x1 conv-BN scale branch + BN identity branch, summed."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.rbr_conv = nn.ModuleList(
            ConvBatchNorm(spec, spec.kernel_size) for _ in range(spec.conv_branches)
        )
        self.rbr_scale = ConvBatchNorm(spec, 1) if spec.has_scale else None
        self.rbr_skip = (
            nn.BatchNorm2d(spec.in_channels, eps=BATCHNORM_EPS) if spec.has_identity else None
        )
        self.se = SqueezeExcite(spec.out_channels, spec.se_channels) if spec.se_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = sum(branch(x) for branch in self.rbr_conv)
        assert isinstance(out, torch.Tensor)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        if self.se is not None:
            out = self.se(out)
        return torch.relu(out)


class FoldedBlock(nn.Module):
    """One conv (+ squeeze-excite) + ReLU: what a train-time block folds into."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.reparam_conv = nn.Conv2d(
            spec.in_channels,
            spec.out_channels,
            kernel_size=spec.kernel_size,
            stride=spec.stride,
            padding=spec.padding,
            groups=spec.groups,
            bias=True,
        )
        self.se = SqueezeExcite(spec.out_channels, spec.se_channels) if spec.se_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reparam_conv(x)
        if self.se is not None:
            out = self.se(out)
        return torch.relu(out)


def _make_block(spec: BlockSpec) -> nn.Module:
    return FoldedBlock(spec) if spec.is_folded else TrainTimeBlock(spec)


class MobileOne(nn.Module):
    """A MobileOne of any spec, train-time or folded, with or without a classifier.

    With a classifier it returns logits (N, classes); headless it returns the
    last stage's feature map (N, C, H/32, W/32).
    """

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stage0 = _make_block(spec.stem)
        for index, stage in enumerate(spec.stages, start=1):
            self.add_module(f"stage{index}", nn.Sequential(*(_make_block(b) for b in stage)))
        self.linear = (
            nn.Linear(spec.feature_channels, spec.num_classes)
            if spec.num_classes is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (or the last feature map of a headless backbone)."""
        x = self.stage0(x)
        for index in range(1, len(self.spec.stages) + 1):
            x = getattr(self, f"stage{index}")(x)
        if self.linear is None:
            return x
        return self.linear(x.mean(dim=(2, 3)))


def instantiate(spec: ModelSpec) -> nn.Module:
    """The module of `spec`'s family (randomly initialised, train mode)."""
    if isinstance(spec, ArchitectureSpec):
        return MobileOne(spec)
    return RepVit(spec)


def build_model(
    spec: ModelSpec,
    state: dict[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """An eval-mode model of `spec`, loaded strictly from a canonical state dict when given."""
    if state is None:
        model = instantiate(spec)
    else:
        # Build on the meta device: no point initialising weights we overwrite.
        with torch.device("meta"):
            model = instantiate(spec)
        model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def build_shapes_only(spec: ModelSpec) -> nn.Module:
    """A weightless (meta-device) eval model: counting needs shapes, not arithmetic or memory."""
    with torch.device("meta"):
        return instantiate(spec).eval()


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical key of `spec`'s state dict with its shape, in module order."""
    model = build_shapes_only(spec)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}

"""Train-time and folded RepViT modules built from a `RepVitSpec`, with timm's key names.

The modules compute what timm's and THU-MIG's do in eval mode (the two list the
same tensors in the same order). A folded model has the same attribute names
with plain biased convs where conv-BN pairs were, so its keys are timm's fused
keys. As in `model.MobileOne`, pooling is a `mean` over the spatial axes, so
nothing bakes in an input size. GELU is the exact (erf) form, as in both peers.
"""

from __future__ import annotations

import torch
from torch import nn

from mobileone_cli.repvit import KERNEL_SIZE, STEM_IN_CHANNELS, RepVitBlockSpec, RepVitSpec
from mobileone_cli.variants import BATCHNORM_EPS


class ConvNorm(nn.Sequential):
    """A bias-free conv and its BatchNorm, under timm's names `c` and `bn`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                           padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCHNORM_EPS)


def conv_unit(in_channels: int, out_channels: int, kernel_size: int, *, folded: bool,
              stride: int = 1, groups: int = 1) -> nn.Module:
    """A conv-BN, or the biased conv it folds into."""
    if folded:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2, groups=groups, bias=True)
    return ConvNorm(in_channels, out_channels, kernel_size, stride=stride, groups=groups)


class RepVggDepthwise(nn.Module):
    """BN(3x3 dw conv-BN + 1x1 dw conv + x); legacy: 3x3 conv-BN + 1x1 conv-BN + x."""

    def __init__(self, channels: int, *, legacy: bool) -> None:
        super().__init__()
        self.conv = ConvNorm(channels, channels, KERNEL_SIZE, groups=channels)
        self.conv1 = (ConvNorm(channels, channels, 1, groups=channels) if legacy
                      else nn.Conv2d(channels, channels, 1, groups=channels, bias=True))
        self.bn = None if legacy else nn.BatchNorm2d(channels, eps=BATCHNORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        out = self.conv(x) + self.conv1(x) + x
        return out if self.bn is None else self.bn(out)


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite as both peers use it: mean, 1x1, ReLU, 1x1, sigmoid gate."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, bottleneck, 1, bias=True)
        self.fc2 = nn.Conv2d(bottleneck, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))


class Mlp(nn.Module):
    """1x1 conv-BN, GELU, 1x1 conv-BN (the residual add is the caller's)."""

    def __init__(self, channels: int, hidden: int, *, folded: bool) -> None:
        super().__init__()
        self.conv1 = conv_unit(channels, hidden, 1, folded=folded)
        self.act = nn.GELU()
        self.conv2 = conv_unit(hidden, channels, 1, folded=folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        return self.conv2(self.act(self.conv1(x)))


class Block(nn.Module):
    """Token mixer, optional squeeze-excite, then x + MLP(x)."""

    def __init__(self, spec: RepVitBlockSpec, *, folded: bool, legacy: bool) -> None:
        super().__init__()
        channels = spec.channels
        self.token_mixer = (
            conv_unit(channels, channels, KERNEL_SIZE, folded=True, groups=channels) if folded
            else RepVggDepthwise(channels, legacy=legacy))
        self.se = SqueezeExcite(channels, spec.se_channels) if spec.se_channels else None
        self.channel_mixer = Mlp(channels, spec.hidden_channels, folded=folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        x = self.token_mixer(x)
        if self.se is not None:
            x = self.se(x)
        return x + self.channel_mixer(x)


class Downsample(nn.Module):
    """A RepViT downsample: pre-block, strided depthwise conv, 1x1 conv, FFN."""

    def __init__(self, spec: RepVitSpec, stage: int, *, folded: bool) -> None:
        super().__init__()
        downsample = spec.stages[stage].downsample
        assert downsample is not None
        channels = downsample.in_channels
        self.pre_block = Block(downsample.pre_block, folded=folded, legacy=spec.legacy)
        self.spatial_downsample = conv_unit(channels, channels, KERNEL_SIZE, folded=folded,
                                            stride=2, groups=channels)
        self.channel_downsample = conv_unit(channels, downsample.out_channels, 1, folded=folded)
        self.ffn = Mlp(downsample.out_channels, downsample.hidden_channels, folded=folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.ffn(x)


class Stage(nn.Module):
    """One RepViT stage: an optional downsample, then its blocks."""

    def __init__(self, spec: RepVitSpec, stage: int, *, folded: bool) -> None:
        super().__init__()
        has_downsample = spec.stages[stage].downsample is not None
        self.downsample = Downsample(spec, stage, folded=folded) if has_downsample else None
        self.blocks = nn.Sequential(*(Block(block, folded=folded, legacy=spec.legacy)
                                      for block in spec.stages[stage].blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class Stem(nn.Module):
    """Two strided 3x3 conv-BN layers with GELU between: 1/4 resolution."""

    def __init__(self, spec: RepVitSpec, *, folded: bool) -> None:
        super().__init__()
        half, full = spec.stem_channels
        self.conv1 = conv_unit(STEM_IN_CHANNELS, half, KERNEL_SIZE, folded=folded, stride=2)
        self.act1 = nn.GELU()
        self.conv2 = conv_unit(half, full, KERNEL_SIZE, folded=folded, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        return self.conv2(self.act1(self.conv1(x)))


class NormLinear(nn.Sequential):
    """BatchNorm1d then Linear, under timm's names `bn` and `l`."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features, eps=BATCHNORM_EPS)
        self.l = nn.Linear(features, classes)


class Classifier(nn.Module):
    """One classifier, or two averaged (eval-mode distillation head)."""

    def __init__(self, features: int, classes: int, *, folded: bool, distillation: bool) -> None:
        super().__init__()
        self.head = nn.Linear(features, classes) if folded else NormLinear(features, classes)
        self.head_dist = ((nn.Linear(features, classes) if folded
                           else NormLinear(features, classes)) if distillation else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        if self.head_dist is None:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two classifiers' outputs, for users who keep the distillation head."""
        assert self.head_dist is not None
        return self.head(x), self.head_dist(x)


class RepVit(nn.Module):
    """A RepViT of any spec, train-time or folded, with or without a classifier.

    With a classifier it returns logits (N, classes); headless it returns the
    last stage's feature map (N, C, H/32, W/32).
    """

    def __init__(self, spec: RepVitSpec) -> None:
        super().__init__()
        self.spec = spec
        folded = spec.is_folded
        self.stem = Stem(spec, folded=folded)
        self.stages = nn.Sequential(*(Stage(spec, index, folded=folded)
                                      for index in range(len(spec.stages))))
        self.head: nn.Module | None = None
        if spec.num_classes is not None:
            if folded and not spec.distillation:
                self.head = nn.Linear(spec.feature_channels, spec.num_classes)
            else:
                self.head = Classifier(spec.feature_channels, spec.num_classes, folded=folded,
                                       distillation=spec.distillation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output on `x`."""
        x = self.stages(self.stem(x))
        if self.head is None:
            return x
        return self.head(x.mean(dim=(2, 3)))

"""RepViT (THU-MIG/RepViT, timm `repvit_*`) as data: variants, the spec, its parts in order.

Nothing here imports torch. The canonical key names of a RepViT are timm's
(`stem.conv1.c.weight`, `stages.1.downsample.pre_block...`, `head.head.l.weight`);
`layouts.rename_repvit` converts them to and from THU-MIG's (`features.N...`).

A RepViT is a stem of two stride-2 conv-BNs with GELU between, four stages and
a BatchNorm1d-Linear classifier, usually with a second (distillation) one whose
eval output is averaged with the first. Stages 1-3 open with a downsample: one
block ("pre_block"), a depthwise stride-2 conv-BN, a 1x1 conv-BN and a residual
MLP. A block is a RepVGG-style depthwise token mixer (3x3 conv-BN + 1x1 conv +
identity, then a BatchNorm; legacy m1-m3: 1x1 conv-BN and no BatchNorm), an
optional squeeze-excite on every other block, and a residual conv-BN, GELU,
conv-BN MLP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar

from mobileone_cli.variants import ArchitectureSpec

STAGE_COUNT = 4
STEM_IN_CHANNELS = 3
KERNEL_SIZE = 3
MLP_RATIO = 2
SE_RATIO = 0.25
SE_DIVISOR = 8
FAMILY = "repvit"


@dataclass(frozen=True)
class RepVitBlockSpec:
    """One RepViT block: token mixer, optional squeeze-excite, residual MLP."""

    channels: int
    hidden_channels: int
    se_channels: int
    """Squeeze-excite bottleneck width; 0 when the block has none."""


@dataclass(frozen=True)
class RepVitDownsampleSpec:
    """A stage's opening: a block, depthwise stride-2 conv, 1x1 conv, residual MLP."""

    pre_block: RepVitBlockSpec
    out_channels: int
    hidden_channels: int

    @property
    def in_channels(self) -> int:
        """Channels the downsample takes in (those of its pre-block)."""
        return self.pre_block.channels


@dataclass(frozen=True)
class RepVitStageSpec:
    """One stage of a RepViT: an optional downsample, then its blocks."""

    downsample: RepVitDownsampleSpec | None
    blocks: tuple[RepVitBlockSpec, ...]


@dataclass(frozen=True)
class RepVitSpec:
    """A whole RepViT, train-time or folded, with or without its classifier(s)."""

    family: ClassVar[str] = FAMILY
    stem_channels: tuple[int, int]
    stages: tuple[RepVitStageSpec, ...]
    num_classes: int | None
    """None for a headless backbone (a feature extractor)."""
    distillation: bool
    """Two classifiers (`head` and `head_dist`) whose outputs are averaged."""
    legacy: bool
    """m1-m3 as first released: the token mixer's 1x1 is a conv-BN, no trailing BatchNorm."""
    is_folded: bool = False

    @property
    def feature_channels(self) -> int:
        """Channels of the last stage's output, the classifier's input."""
        last = self.stages[-1]
        return last.blocks[-1].channels if last.blocks else _stage_out(last)

    def folded(self, *, keep_distillation_head: bool = False) -> RepVitSpec:
        """The spec after folding: the two classifiers become one unless kept."""
        return replace(self, is_folded=True,
                       distillation=self.distillation and keep_distillation_head)

    def structure(self) -> tuple[object, ...]:
        """What survives folding: widths, depths, squeeze-excite placement."""
        return (self.stem_channels, self.stages)


def _stage_out(stage: RepVitStageSpec) -> int:
    assert stage.downsample is not None
    return stage.downsample.out_channels


ModelSpec = ArchitectureSpec | RepVitSpec
"""Any family's architecture spec; `spec.family` says which."""


@dataclass(frozen=True)
class RepVitVariant:
    """A named configuration: stage widths and depths, as the peers' factories build it."""

    name: str
    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    legacy: bool = False


REPVIT_VARIANTS: dict[str, RepVitVariant] = {
    variant.name: variant for variant in (
        RepVitVariant("m0_6", (40, 80, 160, 320), (1, 1, 8, 1)),  # THU-MIG only
        RepVitVariant("m0_9", (48, 96, 192, 384), (2, 2, 14, 2)),
        RepVitVariant("m1_0", (56, 112, 224, 448), (2, 2, 14, 2)),
        RepVitVariant("m1_1", (64, 128, 256, 512), (2, 2, 12, 2)),
        RepVitVariant("m1_5", (64, 128, 256, 512), (4, 4, 24, 4)),
        RepVitVariant("m2_3", (80, 160, 320, 640), (6, 6, 34, 2)),
        RepVitVariant("m1", (48, 96, 192, 384), (2, 2, 14, 2), legacy=True),
        RepVitVariant("m2", (64, 128, 256, 512), (2, 2, 12, 2), legacy=True),
        RepVitVariant("m3", (64, 128, 256, 512), (4, 4, 18, 2), legacy=True),
    )
}


def se_width(channels: int) -> int:
    """timm's SqueezeExcite width: `make_divisible(channels * 0.25, 8, round_limit=0)`."""
    return max(SE_DIVISOR, int(channels * SE_RATIO + SE_DIVISOR / 2) // SE_DIVISOR * SE_DIVISOR)


def build_repvit_spec(
    variant: RepVitVariant, *, num_classes: int | None = 1000, distillation: bool = True
) -> RepVitSpec:
    """The train-time spec of a named variant; squeeze-excite on blocks 0, 2, 4... of a stage."""
    stages = []
    channels = variant.widths[0]
    for index, (width, depth) in enumerate(zip(variant.widths, variant.depths, strict=True)):
        downsample = None
        if index > 0:
            pre_block = RepVitBlockSpec(channels, channels * MLP_RATIO, se_channels=0)
            downsample = RepVitDownsampleSpec(pre_block, out_channels=width,
                                              hidden_channels=width * MLP_RATIO)
        blocks = tuple(
            RepVitBlockSpec(width, width * MLP_RATIO,
                            se_channels=se_width(width) if block % 2 == 0 else 0)
            for block in range(depth)
        )
        stages.append(RepVitStageSpec(downsample, blocks))
        channels = width
    return RepVitSpec(
        stem_channels=(variant.widths[0] // 2, variant.widths[0]),
        stages=tuple(stages),
        num_classes=num_classes,
        distillation=distillation and num_classes is not None,
        legacy=variant.legacy,
    )


def identify_repvit_variant(spec: RepVitSpec) -> str:
    """The variant's name when the spec is a peer's configuration, else "custom".

    Folded, a legacy m1 is a m0_9 and a m2 a m1_1 (only the token mixer's
    train-time branches differ): a folded file is named by the new variant
    where there is one (m3 has none).
    """
    folded_matches = []
    for name, variant in REPVIT_VARIANTS.items():
        reference = build_repvit_spec(variant, num_classes=spec.num_classes)
        if reference.structure() != spec.structure():
            continue
        if spec.is_folded:
            folded_matches.append((variant.legacy, name))
        elif reference.legacy == spec.legacy:
            return name
    return min(folded_matches)[1] if folded_matches else "custom"


@dataclass(frozen=True)
class Unit:
    """One foldable part of a RepViT, at its canonical key prefix."""

    kind: str
    """"conv" (conv-BN), "mixer" (token mixer), "se" (squeeze-excite, copied as is)."""
    prefix: str
    block: RepVitBlockSpec | None = None


def block_units(block: RepVitBlockSpec, prefix: str) -> Iterator[Unit]:
    """The foldable units of one block, with their key prefixes."""
    yield Unit("mixer", f"{prefix}token_mixer.", block)
    if block.se_channels:
        yield Unit("se", f"{prefix}se.", block)
    yield Unit("conv", f"{prefix}channel_mixer.conv1.")
    yield Unit("conv", f"{prefix}channel_mixer.conv2.")


def units(spec: RepVitSpec) -> Iterator[Unit]:
    """Every part of the body in module order, stem first; the classifier is separate."""
    yield Unit("conv", "stem.conv1.")
    yield Unit("conv", "stem.conv2.")
    for index, stage in enumerate(spec.stages):
        if stage.downsample is not None:
            prefix = f"stages.{index}.downsample."
            yield from block_units(stage.downsample.pre_block, f"{prefix}pre_block.")
            for name in ("spatial_downsample.", "channel_downsample.", "ffn.conv1.", "ffn.conv2."):
                yield Unit("conv", f"{prefix}{name}")
        for number, block in enumerate(stage.blocks):
            yield from block_units(block, f"stages.{index}.blocks.{number}.")


HEADS = ("head.head.", "head.head_dist.")
"""Canonical prefixes of the classifier and the distillation classifier."""
FUSED_HEAD = "head."

"""MobileOne S0-S4 as data, and the architecture spec every model is built from.

Nothing here imports torch: `inspect` and `--help` use these types for free.
A named variant and an architecture inferred from a checkpoint are the same
kind of object (`ArchitectureSpec`), so named and custom models take one path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

STAGE_COUNT = 4
STEM_IN_CHANNELS = 3
# Apple's `_make_stage` widths before the multiplier, and its block counts.
BASE_STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 8, 10, 1)
SE_REDUCTION = 16
BATCHNORM_EPS = 1e-5  # every peer of every family uses torch's default; no checkpoint stores it


@dataclass(frozen=True)
class BlockSpec:
    """One MobileOne block: a k x k (or 1 x 1) conv with its train-time branches."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    conv_branches: int
    """Number of k x k conv-BN branches; 0 when the block is already folded."""
    has_scale: bool
    """1 x 1 conv-BN branch (only in k x k blocks)."""
    has_identity: bool
    """BN-only identity branch (only when in == out channels and stride 1)."""
    se_channels: int
    """Squeeze-excite bottleneck width; 0 when the block has none."""

    @property
    def padding(self) -> int:
        """Zero padding that keeps the output size (k // 2)."""
        return self.kernel_size // 2

    @property
    def is_folded(self) -> bool:
        """Whether this is already one conv (no branches left)."""
        return self.conv_branches == 0

    def folded(self) -> BlockSpec:
        """The spec after folding: one conv, no branches."""
        return replace(self, conv_branches=0, has_scale=False, has_identity=False)

    def structure(self) -> tuple[int, int, int, int, int, int]:
        """What survives folding: the fields that tell variants apart in a fused file."""
        return (
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.groups,
            self.se_channels,
        )


@dataclass(frozen=True)
class ArchitectureSpec:
    """A whole MobileOne: the stem, four stages of blocks, and an optional classifier."""

    family: ClassVar[str] = "mobileone"
    stem: BlockSpec
    stages: tuple[tuple[BlockSpec, ...], ...]
    num_classes: int | None
    """None for a headless backbone (a feature extractor)."""

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """Every block, stem first, in model order."""
        return (self.stem, *(block for stage in self.stages for block in stage))

    @property
    def feature_channels(self) -> int:
        """Channels of the last stage's output, the classifier's input."""
        return self.stages[-1][-1].out_channels

    @property
    def is_folded(self) -> bool:
        """Whether this is already one conv (no branches left)."""
        return all(block.is_folded for block in self.blocks)

    def folded(self, *, keep_distillation_head: bool = False) -> ArchitectureSpec:
        """The spec after folding; `keep_distillation_head` is RepViT's and means nothing here."""
        return ArchitectureSpec(
            stem=self.stem.folded(),
            stages=tuple(tuple(block.folded() for block in stage) for stage in self.stages),
            num_classes=self.num_classes,
        )

    def structure(self) -> tuple[tuple[int, ...], ...]:
        """What survives folding, block by block: tells variants apart in a fused file."""
        return tuple(block.structure() for block in self.blocks)


@dataclass(frozen=True)
class VariantConfig:
    """The paper's configuration of one named variant."""

    name: str
    width_multipliers: tuple[float, float, float, float]
    conv_branches: int
    se_blocks: tuple[int, int, int, int]
    """Number of (depthwise, pointwise) block pairs with squeeze-excite, counted from the end."""


VARIANTS: dict[str, VariantConfig] = {
    "s0": VariantConfig("s0", (0.75, 1.0, 1.0, 2.0), conv_branches=4, se_blocks=(0, 0, 0, 0)),
    "s1": VariantConfig("s1", (1.5, 1.5, 2.0, 2.5), conv_branches=1, se_blocks=(0, 0, 0, 0)),
    "s2": VariantConfig("s2", (1.5, 2.0, 2.5, 4.0), conv_branches=1, se_blocks=(0, 0, 0, 0)),
    "s3": VariantConfig("s3", (2.0, 2.5, 3.0, 4.0), conv_branches=1, se_blocks=(0, 0, 0, 0)),
    "s4": VariantConfig("s4", (3.0, 3.5, 3.5, 4.0), conv_branches=1, se_blocks=(0, 0, 5, 1)),
}


def build_spec(
    config: VariantConfig, *, num_classes: int | None = 1000
) -> ArchitectureSpec:
    """The train-time architecture of a named variant, as Apple's reference builds it."""
    stem_width = min(64, int(64 * config.width_multipliers[0]))
    # Apple builds the stem with its default single conv branch, even for S0.
    stem = BlockSpec(
        in_channels=STEM_IN_CHANNELS,
        out_channels=stem_width,
        kernel_size=3,
        stride=2,
        groups=1,
        conv_branches=1,
        has_scale=True,
        has_identity=False,
        se_channels=0,
    )
    stages = []
    channels = stem_width
    for width, multiplier, block_count, se_count in zip(
        BASE_STAGE_WIDTHS, config.width_multipliers, BLOCKS_PER_STAGE, config.se_blocks,
        strict=True,
    ):
        out_channels = int(width * multiplier)
        blocks: list[BlockSpec] = []
        for index in range(block_count):
            stride = 2 if index == 0 else 1
            has_se = index >= block_count - se_count
            blocks.append(
                _block(channels, channels, kernel_size=3, stride=stride, groups=channels,
                       conv_branches=config.conv_branches, has_se=has_se)
            )
            blocks.append(
                _block(channels, out_channels, kernel_size=1, stride=1, groups=1,
                       conv_branches=config.conv_branches, has_se=has_se)
            )
            channels = out_channels
        stages.append(tuple(blocks))
    return ArchitectureSpec(stem=stem, stages=tuple(stages), num_classes=num_classes)


def _block(
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int,
    stride: int,
    groups: int,
    conv_branches: int,
    has_se: bool,
) -> BlockSpec:
    return BlockSpec(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        groups=groups,
        conv_branches=conv_branches,
        has_scale=kernel_size > 1,
        has_identity=in_channels == out_channels and stride == 1,
        se_channels=out_channels // SE_REDUCTION if has_se else 0,
    )


def yangjie_spec(*, num_classes: int | None = 1000) -> ArchitectureSpec:
    """shoutOutYangJie's train-time S0: Apple's S0 but for two branches it leaves out.

    Its stem is a plain conv-BN (no 1x1 scale branch), and the pointwise half of a
    stage's first (stride-2) block pair has no identity BN even where its widths
    match (only stage 1's, 48 -> 48), because their block builds identity BNs from
    the pair's stride. Folded, it has exactly Apple's fused S0 shapes.
    """
    apple = build_spec(VARIANTS["s0"], num_classes=num_classes)
    stages = tuple(
        tuple(replace(block, has_identity=False) if index == 1 else block
              for index, block in enumerate(stage))
        for stage in apple.stages
    )
    return ArchitectureSpec(stem=replace(apple.stem, has_scale=False), stages=stages,
                            num_classes=num_classes)


def identify_variant(spec: ArchitectureSpec) -> str:
    """Name S0-S4 when the spec is the paper's configuration, else "custom".

    A (partly) folded spec has lost its branch counts, so it is compared by
    structure only; fused S1-S3 differ only in widths, which `structure()` keeps.
    shoutOutYangJie's train-time S0 (`yangjie_spec`) is S0 too.
    """
    if spec == yangjie_spec(num_classes=spec.num_classes):
        return "s0"
    partly_folded = any(block.is_folded for block in spec.blocks)
    for name, config in VARIANTS.items():
        reference = build_spec(config, num_classes=spec.num_classes)
        if spec.is_folded or partly_folded:
            if reference.structure() == spec.structure():
                return name
        elif reference == spec:
            return name
    return "custom"

"""Key naming of the three real MobileOne layouts, in both directions.

The three peers (Apple's ml-mobileone, timm, OpenMMLab mmpretrain) name the
same tensors differently but one-to-one. Inside the tool every key is in the
*canonical* naming, which is Apple's (the original); a layout is two regex
tables: how a block is addressed, and how the parts inside a block are named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYOUTS = ("apple", "timm", "mmpretrain")

# Canonical part names, in the order the parts appear inside a block.
_CANONICAL_PARTS = (
    "rbr_conv.{branch}.conv.",
    "rbr_conv.{branch}.bn.",
    "rbr_scale.conv.",
    "rbr_scale.bn.",
    "rbr_skip.",
    "se.reduce.",
    "se.expand.",
    "reparam_conv.",
)


@dataclass(frozen=True)
class Layout:
    name: str
    stem_prefix: str
    stage_prefix: str
    """With `{stage}` (1-based, as Apple counts) and `{block}` placeholders."""
    stage_offset: int
    """What to subtract from Apple's stage number (timm counts stages from 0)."""
    parts: tuple[str, ...]
    """This layout's name of each of `_CANONICAL_PARTS`, same order."""
    head_prefix: str

    def block_prefix(self, stage: int, block: int | None) -> str:
        """Prefix of a block; stage 0 is the stem."""
        if stage == 0:
            return self.stem_prefix
        return self.stage_prefix.format(stage=stage - self.stage_offset, block=block)


_LAYOUTS = {
    "apple": Layout(
        name="apple",
        stem_prefix="stage0.",
        stage_prefix="stage{stage}.{block}.",
        stage_offset=0,
        parts=_CANONICAL_PARTS,
        head_prefix="linear.",
    ),
    "timm": Layout(
        name="timm",
        stem_prefix="stem.",
        stage_prefix="stages.{stage}.{block}.",
        stage_offset=1,
        parts=(
            "conv_kxk.{branch}.conv.",
            "conv_kxk.{branch}.bn.",
            "conv_scale.conv.",
            "conv_scale.bn.",
            "identity.",
            "attn.fc1.",
            "attn.fc2.",
            "reparam_conv.",
        ),
        head_prefix="head.fc.",
    ),
    "mmpretrain": Layout(
        name="mmpretrain",
        stem_prefix="backbone.stage0.",
        stage_prefix="backbone.stage{stage}.{block}.",
        stage_offset=0,
        parts=(
            "branch_conv_list.{branch}.conv.",
            "branch_conv_list.{branch}.norm.",
            "branch_scale.conv.",
            "branch_scale.norm.",
            "branch_norm.",
            "se.conv1.conv.",
            "se.conv2.conv.",
            "branch_reparam.",
        ),
        head_prefix="head.fc.",
    ),
}

# Tensor names inside a part: conv/linear weight and bias, BatchNorm state.
_LEAF = r"(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)"


def get_layout(name: str) -> Layout:
    return _LAYOUTS[name]


@dataclass(frozen=True)
class KeyAddress:
    """Where a tensor sits in a MobileOne, independent of layout."""

    stage: int  # 0 = stem, 1-4 = stages, -1 = classifier head
    block: int | None
    part: int  # index into _CANONICAL_PARTS, or -1 for the head
    branch: int | None
    leaf: str

    def canonical_key(self) -> str:
        return render_key(self, get_layout("apple"))


def _part_pattern(part: str) -> str:
    return re.escape(part).replace(r"\{branch\}", r"(?P<branch>\d+)")


def _block_pattern(layout: Layout) -> str:
    stem = re.escape(layout.stem_prefix)
    stage = (
        re.escape(layout.stage_prefix)
        .replace(r"\{stage\}", r"(?P<stage>\d+)")
        .replace(r"\{block\}", r"(?P<block>\d+)")
    )
    return rf"(?:(?P<stem>{stem})|{stage})"


def _compile(layout: Layout) -> tuple[re.Pattern[str], re.Pattern[str]]:
    parts = "|".join(f"(?P<part{i}>{_part_pattern(p)})" for i, p in enumerate(layout.parts))
    # Each part pattern may contain a `branch` group; Python forbids duplicate
    # group names, so number them and look them up by part below.
    counter = iter(range(len(layout.parts)))
    parts = re.sub(r"\(\?P<branch>", lambda _: f"(?P<branch{next(counter)}>", parts)
    block = re.compile(rf"^{_block_pattern(layout)}(?:{parts}){_LEAF}$")
    head = re.compile(rf"^{re.escape(layout.head_prefix)}(?P<leaf>weight|bias)$")
    return block, head


_PATTERNS = {name: _compile(layout) for name, layout in _LAYOUTS.items()}


def parse_key(key: str, layout_name: str) -> KeyAddress | None:
    """The address of `key` in `layout_name`, or None when the key is not of that layout."""
    layout = _LAYOUTS[layout_name]
    block_pattern, head_pattern = _PATTERNS[layout_name]
    head = head_pattern.match(key)
    if head:
        return KeyAddress(stage=-1, block=None, part=-1, branch=None, leaf=head["leaf"])
    match = block_pattern.match(key)
    if not match:
        return None
    part = next(i for i in range(len(layout.parts)) if match[f"part{i}"] is not None)
    branch_text = match.groupdict().get(f"branch{part}")
    if match["stem"]:
        stage, block = 0, None
    else:
        stage, block = int(match["stage"]) + layout.stage_offset, int(match["block"])
    return KeyAddress(
        stage=stage,
        block=block,
        part=part,
        branch=int(branch_text) if branch_text is not None else None,
        leaf=match["leaf"],
    )


def render_key(address: KeyAddress, layout: Layout) -> str:
    if address.stage == -1:
        return f"{layout.head_prefix}{address.leaf}"
    part = layout.parts[address.part].format(branch=address.branch)
    return f"{layout.block_prefix(address.stage, address.block)}{part}{address.leaf}"


def convert_key(key: str, *, source: str, target: str) -> str:
    """Rename one key between layouts; raises KeyError for a key of no MobileOne part."""
    address = parse_key(key, source)
    if address is None:
        raise KeyError(key)
    return render_key(address, _LAYOUTS[target])

"""Key naming of the real MobileOne layouts, in both directions.

The three peers (Apple's ml-mobileone, timm, OpenMMLab mmpretrain) name the
same tensors differently but one-to-one. Inside the tool every key is in the
*canonical* naming, which is Apple's (the original); a layout is two regex
tables: how a block is addressed, and how the parts inside a block are named.

shoutOutYangJie's MobileOne-S0 (`yangjie`) groups each depthwise and pointwise
block pair under one key and splits Apple's ten-pair stage 3 into its stages 3
and 4, so its addresses are computed rather than tabled (`_parse_yangjie`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYOUTS = ("apple", "timm", "mmpretrain")
"""Layouts of every MobileOne S0-S4, between which any (folded) file converts."""
YANGJIE = "yangjie"
MOBILEONE_LAYOUTS = (*LAYOUTS, YANGJIE)
"""Every MobileOne layout a checkpoint is recognised in; yangjie holds only S0."""

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

# shoutOutYangJie's names of each of `_CANONICAL_PARTS` in the depthwise and pointwise
# half of a block; None where that half has no such part (no scale branch in the
# pointwise half, no squeeze-excite in S0).
_YANGJIE_PARTS = {
    "dw": ("dw_3x3_{branch}.conv.conv.", "dw_3x3_{branch}.conv.bn.", "dw_1x1.conv.conv.",
           "dw_1x1.conv.bn.", "dw_bn_layer.", None, None, "dw_reparam."),
    "pw": ("pw_1x1_{branch}.conv.conv.", "pw_1x1_{branch}.conv.bn.", None, None,
           "pw_bn_layer.", None, None, "pw_reparam."),
}
# Their stage -> (Apple's stage, first block pair in it): Apple's stage 3 is their 3 and 4.
_YANGJIE_STAGES = {1: (1, 0), 2: (2, 0), 3: (3, 0), 4: (3, 5), 5: (4, 0)}
_YANGJIE_SPLIT_PAIRS = 5
_YANGJIE_STEM = {"0.": 0, "1.": 1}  # their stem: plain conv `stage0.0`, its BN `stage0.1`
_YANGJIE_HEAD = "fc1.0."


class YangjieLayout(Layout):
    """Block prefixes of shoutOutYangJie's layout: a pair of Apple blocks is one block."""

    def block_prefix(self, stage: int, block: int | None) -> str:
        if stage == 0 or block is None:
            return self.stem_prefix
        their_stage, pair = _yangjie_block(stage, block)
        return f"stage{their_stage}.{pair}.{'dw' if block % 2 == 0 else 'pw'}_"


def _yangjie_block(stage: int, block: int) -> tuple[int, int]:
    """Their (stage, block) of Apple's block `block` in `stage`."""
    pair = block // 2
    if stage == 3 and pair >= _YANGJIE_SPLIT_PAIRS:
        return 4, pair - _YANGJIE_SPLIT_PAIRS
    return {1: 1, 2: 2, 3: 3, 4: 5}[stage], pair


_LAYOUTS[YANGJIE] = YangjieLayout(
    name=YANGJIE,
    stem_prefix="stage0.",
    stage_prefix="stage{stage}.{block}.",
    stage_offset=0,
    parts=_YANGJIE_PARTS["dw"],  # unused: addresses are computed
    head_prefix=_YANGJIE_HEAD,
)

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


_PATTERNS = {name: _compile(_LAYOUTS[name]) for name in LAYOUTS}
_YANGJIE_KEY = re.compile(
    r"^stage(?P<stage>[1-5])\.(?P<pair>\d+)\.(?P<half>dw|pw)_(?P<part>.+\.)" + _LEAF + "$")
_YANGJIE_STEM_KEY = re.compile(r"^stage0\.(?P<part>[01]\.)" + _LEAF + "$")


def parse_key(key: str, layout_name: str) -> KeyAddress | None:
    """The address of `key` in `layout_name`, or None when the key is not of that layout."""
    if layout_name == YANGJIE:
        return _parse_yangjie(key)
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


def _parse_yangjie(key: str) -> KeyAddress | None:
    if key in (f"{_YANGJIE_HEAD}weight", f"{_YANGJIE_HEAD}bias"):
        return KeyAddress(stage=-1, block=None, part=-1, branch=None,
                          leaf=key.removeprefix(_YANGJIE_HEAD))
    stem = _YANGJIE_STEM_KEY.match(key)
    if stem:
        part = _YANGJIE_STEM[stem["part"]]  # rbr_conv.0.conv / rbr_conv.0.bn
        if part == 0 and stem["leaf"] != "weight":
            return None
        return KeyAddress(stage=0, block=None, part=part, branch=0, leaf=stem["leaf"])
    match = _YANGJIE_KEY.match(key)
    if not match:
        return None
    for part, name in enumerate(_YANGJIE_PARTS[match["half"]]):
        if name is None:
            continue
        pattern = re.escape(name.removeprefix(f"{match['half']}_")).replace(
            r"\{branch\}", r"(?P<branch>\d)")
        found = re.fullmatch(pattern, match["part"])
        if found:
            stage, first_pair = _YANGJIE_STAGES[int(match["stage"])]
            pair = first_pair + int(match["pair"])
            branch = found.groupdict().get("branch")
            return KeyAddress(stage=stage, block=2 * pair + (match["half"] == "pw"), part=part,
                              branch=int(branch) if branch is not None else None,
                              leaf=match["leaf"])
    return None


def _render_yangjie(address: KeyAddress) -> str:
    if address.stage == -1:
        return f"{_YANGJIE_HEAD}{address.leaf}"
    if address.stage == 0:
        # Their stem is one conv and its BN; a folded stem (`reparam_conv`) has no key of
        # theirs: `fold.state_in_layout` writes it as that conv and an identity BN.
        if address.part not in (0, 1) or address.branch != 0:
            raise KeyError(render_key(address, _LAYOUTS["apple"]))
        return f"stage0.{address.part}.{address.leaf}"
    assert address.block is not None
    half = "dw" if address.block % 2 == 0 else "pw"
    name = _YANGJIE_PARTS[half][address.part]
    if name is None:
        raise KeyError(render_key(address, _LAYOUTS["apple"]))
    stage, pair = _yangjie_block(address.stage, address.block)
    return f"stage{stage}.{pair}.{name.format(branch=address.branch)}{address.leaf}"


def render_key(address: KeyAddress, layout: Layout) -> str:
    """The key of `address` in `layout`; KeyError when that layout has no such tensor."""
    if layout.name == YANGJIE:
        return _render_yangjie(address)
    if address.stage == -1:
        return f"{layout.head_prefix}{address.leaf}"
    part = layout.parts[address.part].format(branch=address.branch)
    return f"{layout.block_prefix(address.stage, address.block)}{part}{address.leaf}"


def convert_key(key: str, *, source: str, target: str) -> str:
    """Rename one key between layouts; raises KeyError for a key of no MobileOne part
    or one the target layout cannot name."""
    address = parse_key(key, source)
    if address is None:
        raise KeyError(key)
    return render_key(address, _LAYOUTS[target])

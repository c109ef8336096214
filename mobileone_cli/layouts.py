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

# The layout names live in `defaults`, which the CLI's --help reads without importing this.
from mobileone_cli.defaults import LAYOUTS, REPVIT_LAYOUTS, YANGJIE
from mobileone_cli.defaults import MOBILEONE_LAYOUTS as MOBILEONE_LAYOUTS

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
    """One peer's key naming: how a block and each of its parts are spelled."""

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
        """The key prefix of a block in shoutOutYangJie's stage numbering."""
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
    parts=(),  # unused: addresses are computed (`_parse_yangjie`, `_render_yangjie`)
    head_prefix=_YANGJIE_HEAD,
)

# Tensor names inside a part: conv/linear weight and bias, BatchNorm state.
_LEAF = r"(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)"


def get_layout(name: str) -> Layout:
    """The layout called `name`; KeyError for an unknown one."""
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
        """The key in the canonical (Apple) naming."""
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


# RepViT: canonical names are timm's; THU-MIG's differ by module path only, one
# `features.N` per row of their config. A row that opens a stage (stride 2) holds
# timm's downsample convs; the row before it is timm's `downsample.pre_block`.
_REPVIT_BLOCK_PARTS = (  # (timm, THU-MIG) inside a stride-1 block, longest first
    ("token_mixer.conv1.", "token_mixer.0.conv1."),
    ("token_mixer.conv.", "token_mixer.0.conv."),
    ("token_mixer.bn.", "token_mixer.0.bn."),
    ("token_mixer.", "token_mixer.0."),
    ("se.", "token_mixer.1."),
    ("channel_mixer.conv1.", "channel_mixer.m.0."),
    ("channel_mixer.conv2.", "channel_mixer.m.2."),
)
_REPVIT_DOWNSAMPLE_PARTS = (
    ("spatial_downsample.", "token_mixer.0."),
    ("channel_downsample.", "token_mixer.2."),
    ("ffn.conv1.", "channel_mixer.m.0."),
    ("ffn.conv2.", "channel_mixer.m.2."),
)
_REPVIT_FIXED_PARTS = (
    ("stem.conv1.", "features.0.0."),
    ("stem.conv2.", "features.0.2."),
    ("head.head_dist.", "classifier.classifier_dist."),
    ("head.head.", "classifier.classifier."),
    ("head.", "classifier."),
)
_TIMM_UNIT = re.compile(r"^stages\.(\d+)\.(downsample\.pre_block\.|downsample\.|blocks\.(\d+)\.)(.+)$")
_THUMIG_ROW = re.compile(r"^features\.([1-9]\d*)\.(.+)$")
_THUMIG_DOWNSAMPLE_ROW = "token_mixer.2."


# What may follow a part's prefix: a fused conv or Linear, a conv-BN, a BN, a BN-Linear, SE.
_REPVIT_LEAF = re.compile(r"^(?:(?:c\.|l\.|fc[12]\.)?(?:weight|bias)|(?:bn\.)?"
                          r"(?:running_mean|running_var|num_batches_tracked)|bn\.(?:weight|bias))$")


def _swap(rest: str, parts: tuple[tuple[str, str], ...], *, forward: bool) -> str | None:
    for timm, thumig in parts:
        source, target = (timm, thumig) if forward else (thumig, timm)
        if rest.startswith(source):
            leaf = rest[len(source):]
            return target + leaf if _REPVIT_LEAF.match(leaf) else None
    return None


def _timm_unit(match: re.Match[str]) -> tuple[int, int, int]:
    """(stage, kind, block) of a timm key: kind 0 the pre-block, 1 the downsample convs,
    2 the stage's blocks; sorted, these are THU-MIG's rows in order."""
    if match[2] == "downsample.pre_block.":
        return int(match[1]), 0, 0
    if match[2] == "downsample.":
        return int(match[1]), 1, 0
    return int(match[1]), 2, int(match[3])


def _timm_rows(keys: list[str]) -> dict[tuple[int, int, int], int]:
    """THU-MIG row number of each timm unit, in module order."""
    found = {_timm_unit(match) for key in keys if (match := _TIMM_UNIT.match(key))}
    return {unit: row for row, unit in enumerate(sorted(found), start=1)}


def _thumig_units(keys: list[str]) -> dict[int, str]:
    """timm prefix of each THU-MIG row: stages start at their stride-2 rows."""
    rows: dict[int, bool] = {}
    for key in keys:
        match = _THUMIG_ROW.match(key)
        if match:
            opens = match[2].startswith(_THUMIG_DOWNSAMPLE_ROW)
            rows[int(match[1])] = rows.get(int(match[1]), False) or opens
    prefixes: dict[int, str] = {}
    stage, block = 0, 0
    for row in sorted(rows):
        if rows.get(row + 1):
            prefixes[row] = f"stages.{stage + 1}.downsample.pre_block."
        elif rows[row]:
            stage, block = stage + 1, 0
            prefixes[row] = f"stages.{stage}.downsample."
        else:
            prefixes[row] = f"stages.{stage}.blocks.{block}."
            block += 1
    return prefixes


def rename_repvit(keys: list[str], *, source: str, target: str) -> dict[str, str | None]:
    """Each RepViT key renamed from `source` to `target` layout (timm or thumig); None for
    a key of no RepViT part. The names of a whole state dict are needed: THU-MIG numbers
    its rows through the whole model, so one key alone does not say where it sits."""
    unknown = {source, target} - set(REPVIT_LAYOUTS)
    if unknown:
        raise KeyError(f"no RepViT layout {min(unknown)!r}")
    if source == target:
        return {key: key for key in keys}
    if source == "timm":
        rows = _timm_rows(keys)
        renamed: dict[str, str | None] = {}
        for key in keys:
            match = _TIMM_UNIT.match(key)
            if match is None:
                renamed[key] = _swap(key, _REPVIT_FIXED_PARTS, forward=True)
                continue
            downsample = match[2] == "downsample."
            row = rows[_timm_unit(match)]
            rest = _swap(match[4], _REPVIT_DOWNSAMPLE_PARTS if downsample else _REPVIT_BLOCK_PARTS,
                         forward=True)
            renamed[key] = f"features.{row}.{rest}" if rest is not None else None
        return renamed
    prefixes = _thumig_units(keys)
    renamed = {}
    for key in keys:
        match = _THUMIG_ROW.match(key)
        if match is None:
            renamed[key] = _swap(key, _REPVIT_FIXED_PARTS, forward=False)
            continue
        prefix = prefixes[int(match[1])]
        downsample = prefix.endswith(".downsample.")
        rest = _swap(match[2], _REPVIT_DOWNSAMPLE_PARTS if downsample else _REPVIT_BLOCK_PARTS,
                     forward=False)
        renamed[key] = prefix + rest if rest is not None else None
    return renamed

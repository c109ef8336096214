"""Recognise a MobileOne state dict, infer its architecture, validate it.

Input is the flat tensor dict `reader.read_checkpoint` returns; output is a
`LoadedCheckpoint` in canonical (Apple) key names with an `ArchitectureSpec`
inferred from tensor shapes alone. Every problem is found here, before any
work, and raised as one `BadCheckpointError` line naming the keys.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mobileone_cli.errors import BadCheckpointError, printable
from mobileone_cli.layouts import (
    MOBILEONE_LAYOUTS,
    REPVIT_LAYOUTS,
    YANGJIE,
    KeyAddress,
    convert_key,
    get_layout,
    parse_key,
    rename_repvit,
)
from mobileone_cli.model import expected_shapes
from mobileone_cli.reader import RawCheckpoint, read_checkpoint
from mobileone_cli.repvit import (
    ModelSpec,
    RepVitBlockSpec,
    RepVitDownsampleSpec,
    RepVitSpec,
    RepVitStageSpec,
    identify_repvit_variant,
)
from mobileone_cli.validation import all_finite
from mobileone_cli.variants import STEM_IN_CHANNELS, ArchitectureSpec, BlockSpec, identify_variant

if TYPE_CHECKING:
    import torch

# Parts by index in layouts._CANONICAL_PARTS.
_CONV, _CONV_BN, _SCALE_CONV, _SCALE_BN, _SKIP, _SE_REDUCE, _SE_EXPAND, _REPARAM = range(8)

# Look-alikes are refused by name: a key pattern and what the file looks like.
_LOOK_ALIKES = (
    (re.compile(r"token_mixer|patch_embed|(^|\.)network\.\d|conv_exp\.|final_conv\.|"
                r"stages\.\d+\.blocks\."),
     "a FastViT checkpoint (it shares MobileOne's block names, not its architecture)"),
    (re.compile(r"(^|\.)(stage[5-9]|stages[._][4-9])\."),
     ("the six-stage layout of the `mobileone-pytorch` package (the paper's table), "
     "not one of the Apple, timm or mmpretrain layouts")),
    (re.compile(r"(^|\.)(dw|pw)_[a-z0-9_]*\."),
     ("a single-file re-implementation with `dw_*`/`pw_*` keys, not one of the Apple, "
     "timm or mmpretrain layouts")),
)
# What the fold computes in; float8 and integer (quantized) weights are refused.
_WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SUPPORTED_HINT = (
    "mobileone reads train-time or folded checkpoints of Apple's ml-mobileone, timm "
    "(mobileone_s0..s4 and repvit_*), OpenMMLab mmpretrain, shoutOutYangJie/MobileOne "
    "and THU-MIG/RepViT"
)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A validated state dict of a MobileOne or RepViT (`spec.family`) in canonical key names."""

    source: Path
    sha256: str
    layout: str
    spec: ModelSpec
    variant: str
    state: dict[str, torch.Tensor]
    source_dtype: str
    container: str | None = None
    stripped_prefixes: tuple[str, ...] = ()
    skipped_extras: tuple[str, ...] = ()

    @property
    def is_folded(self) -> bool:
        """Whether the checkpoint holds an already-folded model."""
        return self.spec.is_folded

    @property
    def is_headless(self) -> bool:
        """Whether the model has no classifier (a backbone)."""
        return self.spec.num_classes is None


def output_layouts(spec: ModelSpec) -> tuple[str, ...]:
    """The layouts a folded model of `spec` can be written in (`--layout` choices).

    MobileOne S0-S4 convert between Apple, timm and mmpretrain; a fused S0 (from
    any of them or from shoutOutYangJie's) also to shoutOutYangJie's deploy names.
    RepViT converts between timm and THU-MIG.
    """
    if isinstance(spec, RepVitSpec):
        return REPVIT_LAYOUTS
    s0 = identify_variant(spec.folded()) == "s0"
    return MOBILEONE_LAYOUTS if s0 else tuple(name for name in MOBILEONE_LAYOUTS
                                              if name != YANGJIE)


def load_checkpoint(path: Path, *, ema: bool = False) -> LoadedCheckpoint:
    """Read, recognise and validate a checkpoint file."""
    raw = read_checkpoint(path, ema=ema)
    return recognise(raw)


def recognise(raw: RawCheckpoint) -> LoadedCheckpoint:
    """The family, layout and architecture of a raw state dict, validated."""
    state = _normalise_feature_keys(raw.state)
    repvit_layout = detect_repvit_layout(list(state))
    spec: ModelSpec
    if repvit_layout is not None:
        layout = repvit_layout
        canonical, unexpected, render = _repvit_to_canonical(state, layout)
        spec = infer_repvit(canonical, render=render)
        variant = identify_repvit_variant(spec)
    else:
        layout = detect_layout(list(state))
        canonical, unexpected = _to_canonical(state, layout)
        spec = infer_architecture(canonical, layout=layout)
        variant = identify_variant(spec)

        def render(key: str) -> str:
            return _render(key, layout)

    _validate(canonical, spec, render=render, unexpected=unexpected)
    return LoadedCheckpoint(
        source=raw.path,
        sha256=raw.sha256,
        layout=layout,
        spec=spec,
        variant=variant,
        state=canonical,
        source_dtype=_dominant_dtype(canonical),
        container=raw.container_key,
        stripped_prefixes=raw.stripped_prefixes,
        skipped_extras=raw.skipped_extras,
    )


def _normalise_feature_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone-only files: timm `features_only` (`stages_0.`) and mmpretrain without `backbone.`."""
    renamed: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for original, value in state.items():
        key = re.sub(r"^stages_(\d+)\.", r"stages.\1.", original)
        if re.match(r"^stage\d+\.(\d+\.)?(branch_|se\.conv)", key):
            key = f"backbone.{key}"
        if key in sources:
            raise _same_tensor(sources[key], original)
        renamed[key], sources[key] = value, original
    return renamed


def detect_layout(keys: list[str]) -> str:
    """The layout most keys belong to; refuses look-alikes by name."""
    counts = {layout: sum(parse_key(key, layout) is not None for key in keys)
              for layout in MOBILEONE_LAYOUTS}
    # shoutOutYangJie's keys (`stage5.`, `dw_*`) are what two look-alike patterns catch.
    if counts[YANGJIE] and counts[YANGJIE] >= len(keys) / 2:
        return YANGJIE
    # Part of a shoutOutYangJie file is closest to theirs, not to a look-alike.
    closest_to_yangjie = counts[YANGJIE] and counts[YANGJIE] == max(counts.values())
    for pattern, looks_like in () if closest_to_yangjie else _LOOK_ALIKES:
        example = next((key for key in keys if pattern.search(key)), None)
        if example is not None:
            raise BadCheckpointError(
                f"this file looks like {looks_like} (key '{printable(example)}')",
                hint=_SUPPORTED_HINT
            )
    best = max(counts, key=lambda layout: counts[layout])
    if counts[best] == 0 or counts[best] < len(keys) / 2:
        sample = ", ".join(f"'{printable(key)}'" for key in keys[:3])
        raise BadCheckpointError(
            f"not a MobileOne checkpoint, nor a RepViT one: {_resemblance(keys)} "
            f"(first keys: {sample})",
            hint=_SUPPORTED_HINT,
        )
    return best


def _repvit_counts(keys: list[str]) -> dict[str, int]:
    other = {"timm": "thumig", "thumig": "timm"}
    return {layout: sum(name is not None for name in
                        rename_repvit(keys, source=layout, target=other[layout]).values())
            for layout in REPVIT_LAYOUTS}


def detect_repvit_layout(keys: list[str]) -> str | None:
    """`timm` or `thumig` when most keys name RepViT parts in that layout, else None."""
    counts = _repvit_counts(keys)
    best = max(counts, key=lambda layout: counts[layout])
    return best if counts[best] and counts[best] >= len(keys) / 2 else None


# What a file of each family and layout cannot lack: stem and first stages (or blocks).
_REQUIRED = {
    ("RepViT", "timm"): ("stem.conv1.", "stem.conv2.", "stages.0.blocks.0.", "stages.1.downsample."),
    ("RepViT", "thumig"): ("features.0.0.", "features.0.2.", "features.1."),
}


def _resemblance(keys: list[str]) -> str:
    """Which family and layout the keys most resemble, and what of it is missing."""
    scores = {("RepViT", layout): count for layout, count in _repvit_counts(keys).items()}
    scores.update({("MobileOne", layout): sum(parse_key(key, layout) is not None for key in keys)
                   for layout in MOBILEONE_LAYOUTS})
    family, layout = max(scores, key=lambda name: scores[name])
    if not scores[(family, layout)]:
        return "no key of any supported family and layout"
    required = _REQUIRED.get((family, layout)) or tuple(
        get_layout(layout).block_prefix(stage, None if stage == 0 else 0) for stage in range(5))
    missing = [f"'{prefix}*'" for prefix in required
               if not any(key.startswith(prefix) for key in keys)]
    lacking = f"missing {', '.join(missing)}" if missing else "most of its keys name no part of it"
    return (f"it most resembles a {family} checkpoint in the {layout} layout "
            f"({scores[(family, layout)]} of {len(keys)} keys), {lacking}")


def _to_canonical(
    state: dict[str, torch.Tensor], layout: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    canonical: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        address = parse_key(key, layout)
        if address is None:
            unexpected.append(printable(key))
            continue
        name = address.canonical_key()
        if name in sources:  # e.g. `stage1.1.` and `stage1.01.`
            raise _same_tensor(sources[name], key)
        canonical[name], sources[name] = value, key
    return canonical, unexpected


def _same_tensor(first: str, second: str) -> BadCheckpointError:
    return BadCheckpointError(
        f"keys '{printable(first)}' and '{printable(second)}' name the same tensor",
        hint="the file mixes two namings of one model; save its state_dict() again",
    )


def infer_architecture(state: dict[str, torch.Tensor], *, layout: str = "apple") -> ArchitectureSpec:
    """The architecture of a canonical state dict, from tensor shapes alone.

    Strides are not stored in any tensor: as in every peer, the stem and the
    first block of each stage have stride 2. An identity branch on such a block
    would be contradictory and is reported by validation.
    """
    blocks: dict[tuple[int, int | None], dict[str, torch.Tensor]] = defaultdict(dict)
    addresses: dict[tuple[int, int | None], list[KeyAddress]] = defaultdict(list)
    for key, value in state.items():
        address = parse_key(key, "apple")
        assert address is not None
        if address.stage >= 0:
            blocks[(address.stage, address.block)][key] = value
            addresses[(address.stage, address.block)].append(address)
    if (0, None) not in blocks:
        raise BadCheckpointError(
            f"missing keys: no stem block ('{_render('stage0.', layout)}...')",
            hint="the file holds part of a model; save the whole state_dict()",
        )
    stage_numbers = sorted({stage for stage, _ in blocks if stage > 0})
    if stage_numbers != [1, 2, 3, 4]:
        raise BadCheckpointError(
            f"missing keys: a MobileOne has stages 1-4, this file has stages {stage_numbers}",
            hint="the file holds part of a model; save the whole state_dict()",
        )
    in_channels = STEM_IN_CHANNELS
    stem = _infer_block(addresses[(0, None)], blocks[(0, None)], in_channels, stride=2,
                        layout=layout)
    in_channels = stem.out_channels
    stages = []
    for stage in stage_numbers:
        indices = sorted(block for s, block in blocks if s == stage and block is not None)
        gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
        if gaps:
            missing = ", ".join(f"'{_render(f'stage{stage}.{g}.', layout)}*'" for g in gaps)
            raise BadCheckpointError(f"missing keys: every key of block(s) {missing}",
                                     hint="the file holds part of a model")
        stage_blocks = []
        for index in indices:
            block = _infer_block(addresses[(stage, index)], blocks[(stage, index)], in_channels,
                                 stride=2 if index == 0 else 1, layout=layout)
            stage_blocks.append(block)
            in_channels = block.out_channels
        stages.append(tuple(stage_blocks))
    head_key = "linear.weight" if "linear.weight" in state else "linear.bias"
    head = state.get(head_key)
    if head is not None and (head.dim() == 0 or head.shape[0] == 0):
        raise BadCheckpointError(
            f"shape mismatch: '{_render(head_key, layout)}' is {tuple(head.shape)}, "
            "expected one row per class",
            hint="the tensors of this file do not fit together",
        )
    return ArchitectureSpec(
        stem=stem,
        stages=tuple(stages),
        num_classes=int(head.shape[0]) if head is not None else None,
    )


def _infer_block(
    addresses: list[KeyAddress],
    tensors: dict[str, torch.Tensor],
    in_channels: int,
    *,
    stride: int,
    layout: str,
) -> BlockSpec:
    parts = {address.part for address in addresses}
    kernel_parts = (_REPARAM,) if _REPARAM in parts else (_CONV,)
    kernel = next(
        (tensors[a.canonical_key()] for a in addresses
         if a.part in kernel_parts and a.leaf == "weight"),
        None,
    )
    first = addresses[0]
    prefix = get_layout("apple").block_prefix(first.stage, first.block)
    name = "reparam_conv.weight" if _REPARAM in parts else "rbr_conv.0.conv.weight"
    if kernel is None:
        raise BadCheckpointError(
            f"missing keys: '{_render(prefix + name, layout)}' (a 4-d conv kernel)",
            hint="the file holds part of a model, or a model of another family",
        )
    if kernel.dim() != 4:
        raise BadCheckpointError(
            f"shape mismatch: '{_render(prefix + name, layout)}' is {tuple(kernel.shape)}, "
            "expected a 4-d conv kernel",
            hint="the tensors of this file do not fit together",
        )
    out_channels, channels_per_group, kernel_size = (int(kernel.shape[i]) for i in (0, 1, 2))
    groups = in_channels // channels_per_group if channels_per_group else 0
    # A grouped conv also needs its outputs to split evenly into the groups.
    if not groups or not out_channels or in_channels % channels_per_group or out_channels % groups:
        raise BadCheckpointError(
            f"shape mismatch: '{_render(prefix, layout)}' kernel {tuple(kernel.shape)} does not "
            f"fit {in_channels} input channels",
            hint="the blocks of this file do not chain; is it a MobileOne?",
        )
    if kernel_size % 2 == 0:  # 0 too: 'same' padding of k // 2 needs an odd k
        raise BadCheckpointError(
            f"shape mismatch: '{_render(prefix, layout)}' kernel {tuple(kernel.shape)} is not "
            "an odd k x k kernel",
            hint="MobileOne convs are 3x3 or 1x1 with 'same' padding; is it a MobileOne?",
        )
    se = tensors.get(f"{prefix}se.reduce.weight")
    branches = [a.branch for a in addresses if a.part in (_CONV, _CONV_BN) and a.branch is not None]
    return BlockSpec(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        groups=groups,
        conv_branches=0 if _REPARAM in parts else max(branches) + 1,
        has_scale=bool(parts & {_SCALE_CONV, _SCALE_BN}),
        has_identity=_SKIP in parts,
        se_channels=int(se.shape[0]) if se is not None and se.dim() == 4 else
        (1 if parts & {_SE_REDUCE, _SE_EXPAND} else 0),
    )


def _repvit_to_canonical(
    state: dict[str, torch.Tensor], layout: str
) -> tuple[dict[str, torch.Tensor], list[str], Callable[[str], str]]:
    """timm names for a RepViT state dict, the keys of no part, and a renderer back."""
    other = "thumig" if layout == "timm" else "timm"
    names = rename_repvit(list(state), source=layout, target="timm")
    known = rename_repvit(list(state), source=layout, target=other)
    canonical: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        name = names[key]
        if name is None or known[key] is None:
            unexpected.append(printable(key))
            continue
        canonical[name] = value
    back = {name: key for key, name in names.items() if name is not None}

    def render(canonical_key: str) -> str:
        if canonical_key in back:
            return back[canonical_key]
        # A key the file lacks: rename it next to the file's own keys, so rows count right.
        renamed = rename_repvit([*canonical, canonical_key], source="timm", target=layout)
        return renamed.get(canonical_key) or canonical_key

    return canonical, unexpected, render


def infer_repvit(state: dict[str, torch.Tensor], *, render: Callable[[str], str]) -> RepVitSpec:
    """A RepViT's architecture from the shapes of its canonical (timm) state dict."""
    folded = "stem.conv1.weight" in state

    def width(prefix: str) -> int:
        key = f"{prefix}weight" if folded else f"{prefix}c.weight"
        tensor = state.get(key)
        if tensor is None:
            raise BadCheckpointError(f"missing keys: '{printable(render(key))}' (a conv kernel)",
                                     hint="the file holds part of a model; save the whole "
                                          "state_dict()")
        if tensor.dim() != 4:
            raise BadCheckpointError(
                f"shape mismatch: '{printable(render(key))}' is {tuple(tensor.shape)}, "
                "expected a 4-d conv kernel", hint="the tensors of this file do not fit together")
        return int(tensor.shape[0])

    def block(prefix: str) -> RepVitBlockSpec:
        se = state.get(f"{prefix}se.fc1.weight")
        mixer = f"{prefix}token_mixer." if folded else f"{prefix}token_mixer.conv."
        return RepVitBlockSpec(channels=width(mixer),
                               hidden_channels=width(f"{prefix}channel_mixer.conv1."),
                               se_channels=int(se.shape[0]) if se is not None and se.dim() else 0)

    stage_numbers = sorted({int(match[1]) for key in state
                            if (match := re.match(r"^stages\.(\d+)\.", key))})
    if not stage_numbers or stage_numbers != list(range(len(stage_numbers))):
        raise BadCheckpointError(
            f"missing keys: a RepViT has stages 0-3, this file has stages {stage_numbers}",
            hint="the file holds part of a model; save the whole state_dict()")
    stages = []
    for stage in stage_numbers:
        prefix = f"stages.{stage}."
        downsample = None
        if any(key.startswith(f"{prefix}downsample.") for key in state):
            down = f"{prefix}downsample."
            downsample = RepVitDownsampleSpec(
                pre_block=block(f"{down}pre_block."),
                out_channels=width(f"{down}channel_downsample."),
                hidden_channels=width(f"{down}ffn.conv1."))
        numbers = sorted({int(match[1]) for key in state
                          if (match := re.match(rf"^{prefix}blocks\.(\d+)\.", key))})
        stages.append(RepVitStageSpec(downsample, tuple(
            block(f"{prefix}blocks.{number}.") for number in range(numbers[-1] + 1 if numbers
                                                                    else 0))))
    head = next((state[key] for key in ("head.head.l.weight", "head.head.weight", "head.weight")
                 if key in state), None)
    if head is not None and (head.dim() != 2 or head.shape[0] == 0):
        raise BadCheckpointError(
            f"shape mismatch: the classifier is {tuple(head.shape)}, expected one row per class",
            hint="the tensors of this file do not fit together")
    return RepVitSpec(
        stem_channels=(width("stem.conv1."), width("stem.conv2.")),
        stages=tuple(stages),
        num_classes=int(head.shape[0]) if head is not None else None,
        distillation=any(key.startswith("head.head_dist.") for key in state),
        legacy=any(key.endswith("token_mixer.conv1.c.weight") for key in state),
        is_folded=folded,
    )


def _validate(
    state: dict[str, torch.Tensor],
    spec: ModelSpec,
    *,
    render: Callable[[str], str],
    unexpected: list[str],
) -> None:
    expected = expected_shapes(spec)
    if not any(key.endswith("num_batches_tracked") for key in state):
        # Older checkpoints and some converters drop this counter; folding never reads it.
        expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(printable(render(key)) for key in expected.keys() - state.keys())
    extra = sorted(unexpected + [printable(render(k)) for k in state.keys() - expected.keys()])
    if missing or extra:
        found = [f"missing keys: {', '.join(missing)}" if missing else "",
                 f"unexpected keys: {', '.join(extra)}" if extra else ""]
        raise BadCheckpointError(
            f"the checkpoint does not match the architecture its shapes describe: "
            f"{'; '.join(part for part in found if part)}",
            hint="was the file saved from a modified model, or cut short?",
        )
    mismatched = [
        f"'{printable(render(key))}' is {tuple(value.shape)}, expected {expected[key]}"
        for key, value in state.items()
        if tuple(value.shape) != expected[key]
    ]
    if mismatched:
        raise BadCheckpointError(f"shape mismatch: {'; '.join(sorted(mismatched))}",
                                 hint="the tensors of this file do not fit together")
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        problem = _value_problem(key, value)
        if problem is not None:  # the key is rendered only now: that parses it (S4: 40 ms)
            message, hint = problem
            raise BadCheckpointError(f"'{printable(render(key))}' {message}", hint=hint)


def _value_problem(key: str, value: torch.Tensor) -> tuple[str, str] | None:
    """What is wrong with one tensor of a checkpoint, and the hint; None when nothing is."""
    import torch

    if value.is_meta or value.layout != torch.strided:
        layout_name = str(value.layout).removeprefix("torch.")
        kind = "a meta tensor (no values)" if value.is_meta else f"a {layout_name} tensor"
        return (f"is {kind}; weights must be dense tensors with values",
                "save the state_dict() of a model whose weights are loaded, "
                "with .to_dense() on sparse ones")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in _WEIGHT_DTYPES:
        return (f"has dtype {dtype}; weights must be {', '.join(_WEIGHT_DTYPES[:-1])} "
                f"or {_WEIGHT_DTYPES[-1]}", "was this file quantized? fold the float checkpoint")
    if not all_finite(value):
        return "contains NaN or Inf values", "the training run diverged or the file is corrupt"
    if key.endswith("running_var") and bool((value < 0).any()):
        return "has negative running variances", "BatchNorm statistics are corrupt"
    return None


def _render(canonical_key: str, layout: str) -> str:
    """A canonical key, or a block prefix such as `stage1.3.`, in the user's own layout."""
    if not canonical_key.endswith("."):
        try:
            return convert_key(canonical_key, source="apple", target=layout)
        except KeyError:  # a tensor the layout has no name for (a folded yangjie stem)
            return canonical_key
    match = re.match(r"^stage(\d+)\.(?:(\d+)\.)?$", canonical_key)
    assert match is not None, canonical_key
    block = int(match[2]) if match[2] is not None else None
    return get_layout(layout).block_prefix(int(match[1]), block)


def _dominant_dtype(state: dict[str, torch.Tensor]) -> str:
    dtypes = [str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()]
    return max(set(dtypes), key=dtypes.count) if dtypes else "float32"

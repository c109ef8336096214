"""The best hand-made ONNX export of folded MobileOne weights, to race `mobileone export` against.

What someone without this tool would write: a plain fused model in timm's style
(`MobileOneBlock` after `reparameterize_model`: one conv, squeeze-excite pooling
with `mean`, ReLU; the head `AdaptiveAvgPool2d(1)` + `flatten` + `Linear`),
loaded with the folded weights `mobileone fold` wrote, exported with
`torch.onnx.export(dynamo=False, opset 17)` and simplified with onnxsim. The
architecture is read from the weights' shapes, so it is written once for S0-S4.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17
STRIDE = 2
"""Stem and the first block of each stage downsample; no tensor stores it."""
_BLOCK_KEY = re.compile(r"^stage(\d+)\.(?:(\d+)\.)?reparam_conv\.weight$")


class SqueezeExcite(nn.Module):
    """timm's SEModule without its (identity) norm: mean, fc1, ReLU, fc2, sigmoid gate."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, bottleneck, kernel_size=1)
        self.fc2 = nn.Conv2d(bottleneck, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class FusedBlock(nn.Module):
    """A reparameterised block: conv, optional squeeze-excite, ReLU."""

    def __init__(self, weight: torch.Tensor, *, in_channels: int, stride: int,
                 se_bottleneck: int) -> None:
        super().__init__()
        out_channels, per_group, size, _ = weight.shape
        self.conv = nn.Conv2d(in_channels, out_channels, size, stride=stride, padding=size // 2,
                              groups=in_channels // per_group)
        self.se = SqueezeExcite(out_channels, se_bottleneck) if se_bottleneck else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.se(self.conv(x)))


class ClassifierHead(nn.Module):
    """timm's ClassifierHead: global average pool, flatten, linear."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class FusedMobileOne(nn.Module):
    """Stem, stages of fused blocks, head; shaped by a folded canonical state dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        prefixes = _block_prefixes(state)
        blocks = []
        in_channels = 3
        for stage, index, prefix in prefixes:
            weight = state[f"{prefix}reparam_conv.weight"]
            reduce = state.get(f"{prefix}se.reduce.weight")
            blocks.append((stage, FusedBlock(
                weight, in_channels=in_channels, stride=STRIDE if index == 0 else 1,
                se_bottleneck=0 if reduce is None else reduce.shape[0])))
            in_channels = weight.shape[0]
        self.stem = blocks[0][1]
        stage_count = max(stage for stage, _ in blocks)
        self.stages = nn.ModuleList(
            nn.Sequential(*(block for stage, block in blocks if stage == number))
            for number in range(1, stage_count + 1)
        )
        self.head = ClassifierHead(in_channels, state["linear.weight"].shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def _block_prefixes(state: dict[str, torch.Tensor]) -> list[tuple[int, int, str]]:
    """(stage, index in stage, key prefix) of every block in order; the stem is stage 0."""
    found = []
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index = int(match[1]), int(match[2] or 0)
            found.append((stage, index, key.removesuffix("reparam_conv.weight")))
    return sorted(found)


def timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical (Apple) folded keys renamed to `FusedMobileOne`'s attributes."""
    renamed = {}
    for key, value in state.items():
        name = re.sub(r"^stage0\.", "stem.", key)
        name = re.sub(r"^stage(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.", name)
        name = (name.replace("reparam_conv", "conv").replace("se.reduce", "se.fc1")
                .replace("se.expand", "se.fc2").replace("linear.", "head.fc."))
        renamed[name] = value
    return renamed


def build(folded_safetensors: Path) -> FusedMobileOne:
    """The hand-made model with the weights of a file written by `mobileone fold`."""
    from safetensors.torch import load_file

    state = load_file(str(folded_safetensors))
    with torch.device("meta"):
        model = FusedMobileOne(state)
    model.load_state_dict(timm_names(state), strict=True, assign=True)
    return model.eval()


def export(model: nn.Module, path: Path, *, size: int = 224) -> None:
    """torch.onnx.export (TorchScript exporter, opset 17, constant folding), then onnxsim."""
    import onnx
    import onnxsim

    example = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
        torch.onnx.export(model, (example,), str(path), input_names=["image"],
                          output_names=["logits"], opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    simplified, valid = onnxsim.simplify(onnx.load(str(path)))
    if not valid:
        raise RuntimeError(f"onnxsim could not validate the hand-made export {path}")
    onnx.save(simplified, str(path))

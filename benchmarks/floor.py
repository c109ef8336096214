"""The work a fold cannot avoid, as a bare script: the floor `mobileone fold` is measured against.

    python benchmarks/floor.py CHECKPOINT VARIANT

Imports torch, loads the checkpoint with `torch.load(weights_only=True)`, builds
the train-time model, runs the verification forward passes `mobileone fold`
runs (fp32 and float64 on `verify.default_inputs(224)`), folds the weights with
the shortest vectorised arithmetic, and runs the folded model on the same
inputs. Nothing is validated, hashed or written. Prints one JSON line: the
seconds of each phase and the fold's relative error, which proves the floor did
real work (a wrong fold would be cheaper and would show here).

The model classes and inputs are the tool's own (`mobileone_cli.model`,
`verify.default_inputs`): they are the definition of the network, not overhead,
and importing them costs nothing beyond torch.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import json  # after START: the clock covers every import
import sys
from dataclasses import dataclass

import torch

from mobileone_cli.model import BATCHNORM_EPS, build_model
from mobileone_cli.proof.inputs import default_inputs
from mobileone_cli.variants import VARIANTS, ArchitectureSpec, BlockSpec, build_spec

State = dict[str, torch.Tensor]


def fused_branch(kernel: torch.Tensor, state: State, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of a conv followed by the eval-mode BatchNorm at `prefix`, in float64."""
    gamma, beta, mean, variance = (state[prefix + name].double() for name in
                                   ("weight", "bias", "running_mean", "running_var"))
    scale = gamma / torch.sqrt(variance + BATCHNORM_EPS)
    return kernel.double() * scale.reshape(-1, 1, 1, 1), beta - mean * scale


def fold_block(block: BlockSpec, state: State, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of a block's branches as one kernel and bias."""
    size = block.kernel_size
    branches = [fused_branch(state[f"{prefix}rbr_conv.{i}.conv.weight"], state,
                             f"{prefix}rbr_conv.{i}.bn.") for i in range(block.conv_branches)]
    if block.has_scale:
        pad = size // 2
        scale_kernel = torch.nn.functional.pad(state[f"{prefix}rbr_scale.conv.weight"], [pad] * 4)
        branches.append(fused_branch(scale_kernel, state, f"{prefix}rbr_scale.bn."))
    if block.has_identity:
        channels, per_group = block.in_channels, block.in_channels // block.groups
        identity = torch.zeros(channels, per_group, size, size, dtype=torch.float64)
        rows = torch.arange(channels)
        identity[rows, rows % per_group, size // 2, size // 2] = 1.0  # vectorised, no Python loop
        branches.append(fused_branch(identity, state, f"{prefix}rbr_skip."))
    kernel = sum(k for k, _ in branches)
    bias = sum(b for _, b in branches)
    assert isinstance(kernel, torch.Tensor) and isinstance(bias, torch.Tensor)
    return kernel.float(), bias.float()


def fold(spec: ArchitectureSpec, state: State) -> State:
    """The folded model's canonical state dict."""
    blocks = [(spec.stem, "stage0.")] + [
        (block, f"stage{s}.{i}.") for s, stage in enumerate(spec.stages, start=1)
        for i, block in enumerate(stage)
    ]
    folded: State = {}
    for block, prefix in blocks:
        kernel, bias = fold_block(block, state, prefix)
        folded[f"{prefix}reparam_conv.weight"], folded[f"{prefix}reparam_conv.bias"] = kernel, bias
        for name in ("se.reduce.weight", "se.reduce.bias", "se.expand.weight", "se.expand.bias"):
            if prefix + name in state:
                folded[prefix + name] = state[prefix + name]
    folded["linear.weight"], folded["linear.bias"] = state["linear.weight"], state["linear.bias"]
    return folded


def forward(model: torch.nn.Module, arrays: list[torch.Tensor], dtype: torch.dtype
            ) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(array.to(dtype)) for array in arrays]


class Laps:
    """Seconds of each named phase, each timed from the end of the one before."""

    def __init__(self, started: float) -> None:
        self.phases: dict[str, float] = {}
        self.mark = started

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.mark
        self.mark = now


@dataclass(frozen=True)
class Floor:
    """What the floor computed: the folded model, the inputs, and the fold's relative error."""

    folded_state: State
    folded_model: torch.nn.Module
    arrays: list[torch.Tensor]
    max_rel_diff: float


def run_floor(path: str, variant: str, lap: Laps) -> Floor:
    """Load, run the train-time model in fp32 and float64, fold, run the folded model."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    lap("load")
    spec = build_spec(VARIANTS[variant], num_classes=1000)
    arrays = [torch.from_numpy(batch.array) for batch in default_inputs(224)]
    outputs = {}
    for dtype in (torch.float32, torch.float64):
        outputs[dtype] = forward(build_model(spec, state, dtype=dtype), arrays, dtype)
        lap(f"train-time forward {str(dtype).removeprefix('torch.')}")
    folded_state = fold(spec, state)
    lap("fold arithmetic")
    model = build_model(spec.folded(), folded_state).eval()
    folded = forward(model, arrays, torch.float32)
    lap("folded forward")
    scale = max(float(out.abs().max()) for out in outputs[torch.float64])
    error = max(float((f.double() - t.double()).abs().max())
                for f, t in zip(folded, outputs[torch.float32]))
    return Floor(folded_state, model, arrays, error / scale)


def main() -> None:
    lap = Laps(START)
    lap("import")
    floor = run_floor(sys.argv[1], sys.argv[2], lap)
    print(json.dumps({"phases": lap.phases, "max_rel_diff": floor.max_rel_diff}))


if __name__ == "__main__":
    main()

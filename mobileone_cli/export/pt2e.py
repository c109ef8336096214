"""PyTorch 2 Export (PT2E) post-training quantization, shared by the ExecuTorch and LiteRT writers.

Both on-device targets quantize the way their own docs do: `torch.export` of
the folded model, `prepare_pt2e` with the target's quantizer (observers
inserted where its kernels take int8), every calibration image through the
prepared model, `convert_pt2e` (quantize/dequantize pairs with the measured
scales, int8 weights), then the target's usual lowering of the converted
module. The converted module is the tight reference of the artifact: torch
runs it as fake quantization, in float32, with the artifact's own scales.

`prepare_pt2e` and `convert_pt2e` are torchao's (`torchao.quantization.pt2e`);
the copies in `torch.ao.quantization` are deprecated. The model is exported
with a dynamic batch so calibration runs in chunks and the reference takes any
batch; the writers export the converted module again at batch 1.

Names: `keep_float` takes the folded model's layer names (`stage1.0.reparam_conv`,
`linear`), the qualified names of `torch.export`'s `nn_module_stack`, which
torchao's `get_module_name_filter` reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import UsageError
from mobileone_cli.export.backend import Quantization

if TYPE_CHECKING:
    import numpy as np
    import torch

ACTIVATION_MODES = ("w8a8",)
"""The on-device modes that quantize activations, so need calibration images."""
CALIBRATION_CHUNK = 16
"""Calibration images per forward pass: fixed, so the observers see the same sequence each run
(a histogram observer's result depends on how the images are grouped)."""


def converted_module(model: torch.nn.Module, quantizer: Any, calibration: np.ndarray, *,
                     input_size: int, fold_quantize: bool = True) -> torch.nn.Module:
    """The PT2E-converted (fake-quantized) `model`: prepared with `quantizer`, calibrated on
    every image of `calibration` (normalised float32 N x 3 x S x S), converted.

    The result takes normalised float32 N x 3 x S x S batches of any N.
    `fold_quantize=False` keeps float weights behind quantize/dequantize pairs
    (litert-torch's converter folds them itself).
    """
    import numpy as np
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch")
    graph = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), CALIBRATION_CHUNK):
            # `load_images` arrays are views with HWC strides; runtimes need C-order input.
            chunk = np.ascontiguousarray(calibration[start : start + CALIBRATION_CHUNK],
                                         dtype=np.float32)
            prepared(torch.from_numpy(chunk))
    converted = convert_pt2e(prepared, fold_quantize=fold_quantize)
    move_exported_model_to_eval(converted)
    return converted


def check_request(quantization: Quantization, *, target: str, modes: Sequence[str]) -> None:
    """A one-line `UsageError` for a mode the target does not write or an activation mode
    without calibration images (the pipeline refuses both before any work; this is the
    backend's own guard for direct callers)."""
    if quantization.mode not in modes:
        raise UsageError(f"--quantize {quantization.mode} is not a mode of --to {target}",
                         hint=f"modes of {target}: {', '.join(modes)}")
    if quantization.mode in ACTIVATION_MODES and (
            quantization.calibration is None or len(quantization.calibration) == 0):
        raise UsageError(f"--quantize {quantization.mode} needs calibration images",
                         hint="pass --calibration DIR (random noise is not calibration)")


def quantized_layers(converted: torch.nn.Module) -> dict[str, bool]:
    """Every conv and linear of a converted module (or of a writer's `float32_only` reference)
    by folded layer name: True when its weight reaches it through a dequantize (int8), False
    when it is a float constant."""
    import torch

    weighted = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    layers: dict[str, bool] = {}
    converted = converted.__dict__.get("inner", converted)  # a `float32_only` reference
    graph: torch.fx.Graph = converted.graph  # type: ignore[assignment]
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in weighted:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else node.name
        weight = node.args[1]
        layers[path] = (isinstance(weight, torch.fx.Node) and weight.op == "call_function"
                        and "dequantize" in str(weight.target))
    return layers


def outside(keep_float: Sequence[str]) -> Callable[[torch.fx.Node], bool]:
    """A quantizer's node filter: True for a node of no layer in `keep_float` (so quantized)."""
    from torchao.quantization.pt2e.quantizer import get_module_name_filter

    kept = [get_module_name_filter(layer) for layer in sorted(set(keep_float))]

    def quantized(node: torch.fx.Node) -> bool:
        return not any(matches(node) for matches in kept)

    return quantized


def round_biases(converted: torch.nn.Module) -> torch.nn.Module:
    """`converted` with each int8 layer's float bias rounded as the int8 kernels store it.

    XNNPACK and LiteRT keep a quantized conv's bias in int32 at scale
    input scale x weight scale (per output channel); the PT2E module keeps it
    float. Reparameterized kernels have outlier channels with large weight
    scales, where that step exceeds an output step (measured on the digits
    model: up to 4 output steps), so the reference rounds too. In place;
    returns `converted`.
    """
    import torch

    graph: torch.fx.Graph = converted.graph  # type: ignore[assignment]
    weighted = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in weighted or len(node.args) < 3:
            continue
        source, weight, bias = node.args[:3]
        input_scale = _dequantize_scale(converted, source)
        weight_scale = _dequantize_scale(converted, weight)
        if input_scale is None or weight_scale is None or not isinstance(bias, torch.fx.Node) \
                or bias.op != "get_attr":
            continue
        values = _attribute(converted, str(bias.target))
        step = (input_scale * weight_scale).to(torch.float32).reshape(-1)
        rounded = torch.round(values.detach().to(torch.float32) / step) * step
        _set_attribute(converted, str(bias.target), rounded.to(values.dtype))
    return converted


def _dequantize_scale(module: torch.nn.Module, node: Any) -> torch.Tensor | None:
    """The scale (a scalar or per-channel tensor) of the dequantize node `node`, else None."""
    import torch

    if not isinstance(node, torch.fx.Node) or node.op != "call_function" \
            or "dequantize" not in str(node.target):
        return None
    scale = node.args[1]
    if isinstance(scale, torch.fx.Node):
        return _attribute(module, str(scale.target)) if scale.op == "get_attr" else None
    return torch.tensor(float(scale))  # type: ignore[arg-type]


def _attribute(module: torch.nn.Module, target: str) -> torch.Tensor:
    owner = module
    *path, last = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, last)


def _set_attribute(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    import torch

    owner = module
    *path, last = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    current = getattr(owner, last)
    if isinstance(current, torch.nn.Parameter):
        current.data = value
    else:
        setattr(owner, last, value)


def float32_only(module: torch.nn.Module) -> torch.nn.Module:
    """`module` behind a wrapper that always runs it in float32, whatever `.to()` and the input.

    A converted module's quantize ops take float32 only; the proof also runs its
    references on float64 copies (`run_module_reference`). The wrapper keeps
    the module out of its own parameters (so `.to(float64)` leaves it alone),
    casts the input to float32 and the output back to the input's dtype: the
    float64 run is the float32 run, exactly.
    """
    import torch

    class Float32Only(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.__dict__["inner"] = module  # not a submodule: `.to()` must not reach it

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            inner: torch.nn.Module = self.__dict__["inner"]
            return inner(batch.to(torch.float32)).to(batch.dtype)

    return Float32Only()

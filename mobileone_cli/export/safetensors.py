"""Folded weights as safetensors, in a peer's inference-mode key names."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.export.backend import Candidate, WriteContext
from mobileone_cli.fold import state_in_layout
from mobileone_cli.model import build_model
from mobileone_cli.options import SafetensorsOptions
from mobileone_cli.proof.compare import torch_runner
from mobileone_cli.results import Declared
from mobileone_cli.validation import check_fits_dtype

if TYPE_CHECKING:
    import torch

name = "safetensors"
suffix = ".safetensors"
extra = None
HEADER_ALIGNMENT = 8
DTYPES = ("float32", "float16", "bfloat16")
PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def missing() -> str | None:
    """safetensors is a dependency of the tool itself."""
    return None


def companions(path: Path) -> tuple[Path, ...]:
    """Nothing ships beside this target's file."""
    return ()


def serialize(state: dict[str, torch.Tensor], *, layout: str, metadata: dict[str, str],
              family: str = "mobileone") -> bytes:
    """Bytes of a safetensors file of the canonical `state` of a model of `family`, keys
    renamed to `layout`.

    The same input always gives the same bytes: safetensors writes its
    `__metadata__` map in a per-process random (hash) order, so the header is
    re-serialised with sorted keys. Tensor data offsets are relative to the end
    of the header, so only the header changes.
    """
    from safetensors.torch import save

    renamed = state_in_layout(state, layout=layout, family=family)
    return canonical_header(save(renamed, metadata=metadata))


def canonical_header(data: bytes) -> bytes:
    """`data` with its JSON header re-serialised with sorted keys (and the same tensors)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def write(model: torch.nn.Module, path: Path, *, context: WriteContext) -> None:
    """The folded model's weights in the options' dtype and layout, at `path`."""
    import torch

    options = context.options or SafetensorsOptions()
    layout = options.layout or context.metadata.get("mobileone.layout", "apple")
    weights = {key: value.detach() for key, value in model.state_dict().items()}
    # A value beyond the dtype's range is a failed verification naming the tensor as the
    # file names it, not a "diverged training run" when the written file is re-read.
    check_fits_dtype(state_in_layout(weights, layout=layout, family=context.family),
                     options.dtype, name=str)
    state = {key: value.to(getattr(torch, options.dtype)) for key, value in weights.items()}
    # "format": "pt" tells torch loaders (transformers, timm) the tensors are torch's.
    metadata = {**context.metadata, "format": "pt", "mobileone.layout": layout,
                "mobileone.dtype": options.dtype}
    path.write_bytes(serialize(state, layout=layout, metadata=metadata, family=context.family))


def open(path: Path) -> Candidate:
    """The file re-read and rebuilt in torch: proof of the bytes, not of tensors in memory."""
    import torch

    loaded = load_checkpoint(path)
    model = build_model(loaded.spec, loaded.state)
    output = "logits" if loaded.spec.num_classes is not None else "features"
    declared = Declared(
        runtime=f"torch {torch.__version__}",
        input_name="image",
        input_shape=("batch", 3, "height", "width"),
        output_names=(output,),
        precision=PRECISIONS.get(loaded.source_dtype, loaded.source_dtype),
        details={"layout": loaded.layout, "dtype": loaded.source_dtype,
                 "variant": loaded.variant},
    )
    # Built in float32 whatever the stored dtype, so `run` is already full-precision arithmetic.
    runner = torch_runner(model)
    return Candidate(declared=declared, run=runner, run_full_precision=runner)

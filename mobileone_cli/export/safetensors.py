"""Folded weights as safetensors, in a peer's inference-mode key names."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from mobileone_cli.checkpoint import LoadedCheckpoint, load_checkpoint
from mobileone_cli.export.backend import Candidate, Runner, WriteContext
from mobileone_cli.fold import state_in_layout
from mobileone_cli.model import build_model
from mobileone_cli.options import SafetensorsOptions
from mobileone_cli.proof.compare import torch_runner
from mobileone_cli.results import Declared
from mobileone_cli.validation import check_fits_dtype

if TYPE_CHECKING:
    import numpy as np
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
    text = canonical_text(data[8 : 8 + length])
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def canonical_text(header: bytes) -> bytes:
    """A safetensors JSON header with sorted keys, padded to the format's 8-byte alignment."""
    parsed = json.loads(header)
    metadata = parsed.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(sorted(parsed.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % HEADER_ALIGNMENT)


def write_file(state: dict[str, torch.Tensor], path: Path, *, layout: str,
               metadata: dict[str, str], family: str = "mobileone") -> None:
    """`serialize`'s bytes written at `path` without holding them in memory.

    safetensors streams the tensors into the file (its in-memory `save` holds the
    file's bytes twice); the header is then made canonical in place. Its length does
    not change, as the same map is re-ordered in the same compact form; were it to,
    the file is rewritten.
    """
    from safetensors.torch import save_file

    try:
        save_file(state_in_layout(state, layout=layout, family=family), str(path),
                  metadata=metadata)
    except OSError:
        raise
    except Exception as error:  # safetensors reports an I/O failure as its own type
        translated = _as_os_error(error, path)
        if translated is error:
            raise
        raise translated from error
    with path.open("r+b") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        text = canonical_text(stream.read(length))
        if len(text) == length:
            stream.seek(8)
            stream.write(text)
            return
        tensors = stream.read()
        stream.seek(0)
        stream.write(struct.pack("<Q", len(text)) + text)
        stream.write(tensors)
        stream.truncate()


def _as_os_error(error: Exception, path: Path) -> Exception:
    """safetensors' Rust I/O error ("Error while serializing: I/O error: File too large (os
    error 27)", as measured under `ulimit -f`) as the OSError it is, so a full disk reads as
    one everywhere; any other error as it was."""
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


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
    write_file(state, path, layout=layout, metadata=metadata, family=context.family)


def open(path: Path) -> Candidate:
    """The file re-read and rebuilt in torch: proof of the bytes, not of tensors in memory.

    The candidate also exposes the canonical tensors read back (`Candidate.state`): the
    proof compares them bit for bit with the fold's, and runs the file's model (built on
    first use) only when they differ.
    """
    import torch

    loaded = load_checkpoint(path)
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
    runner = _built_on_first_run(loaded)
    return Candidate(declared=declared, run=runner, run_full_precision=runner, spec=loaded.spec,
                     state=loaded.state, sha256=loaded.sha256)


def _built_on_first_run(loaded: LoadedCheckpoint) -> Runner:
    """The file's float32 torch model as a runner, built only when a batch first comes."""
    models: list[torch.nn.Module] = []

    def run(array: np.ndarray) -> np.ndarray:
        if not models:
            models.append(build_model(loaded.spec, loaded.state))
        return torch_runner(models[0])(array)

    return run

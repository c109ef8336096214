"""Folded weights as safetensors, in a peer's inference-mode key names."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mobileone_cli.layouts import convert_key
from mobileone_cli.validation import check_fits_dtype

if TYPE_CHECKING:
    import torch

    from mobileone_cli.api import FoldedModel
    from mobileone_cli.checkpoint import LoadedCheckpoint
    from mobileone_cli.verify import Candidate, Verification

HEADER_ALIGNMENT = 8


def serialize(state: dict[str, torch.Tensor], *, layout: str, metadata: dict[str, str]) -> bytes:
    """Bytes of a safetensors file of the canonical `state`, keys renamed to `layout`.

    The same input always gives the same bytes: safetensors writes its
    `__metadata__` map in a per-process random (hash) order, so the header is
    re-serialised with sorted keys. Tensor data offsets are relative to the end
    of the header, so only the header changes.
    """
    from safetensors.torch import save

    renamed = {convert_key(key, source="apple", target=layout): value for key, value in state.items()}
    return canonical_header(save(renamed, metadata=metadata))


def canonical_header(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


DTYPES = ("float32", "float16", "bfloat16")


def export(folded: FoldedModel, path: Path, *, layout: str, metadata: dict[str, str],
           dtype: str = "float32", rtol: float | None = None) -> Verification:
    """Write the folded weights in `dtype` at `path`, re-read the file and verify it.

    A float32 file gets the fold's own rule. A float16/bfloat16 file cannot meet
    it: storing rounds every weight (by up to 2^-11 or 2^-8 of its size). So
    its tolerance adds twice that rounding's measured effect, the *storage
    floor*: how far the folded model moves when its in-memory weights are
    rounded to `dtype`. That is not circular: the fold itself was proven in
    fp32 before anything is written; this proves the file holds that fold.
    """
    import torch

    # issue 9: a value beyond the dtype's range is a failed verification, named, not a
    # "diverged training run" when the written file is re-read.
    check_fits_dtype(folded.state, dtype,
                     name=lambda key: convert_key(key, source="apple", target=layout))
    state = {key: value.to(getattr(torch, dtype)) for key, value in folded.state.items()}
    path.write_bytes(serialize(state, layout=layout, metadata={**metadata, "mobileone.dtype": dtype}))
    return verify_file(path, folded, rtol=rtol)


def verify_file(path: Path, folded: FoldedModel, *, rtol: float | None = None) -> Verification:
    """A written file against the train-time reference, with the rule its dtype calls for."""
    from mobileone_cli.verify import compare, tolerance

    written = _read(path)
    candidate = _candidate(written)
    dtypes = {value.dtype for value in written.state.values() if value.is_floating_point()}
    reduced = sorted(str(d).removeprefix("torch.") for d in dtypes if d.itemsize < 4)
    if not reduced or rtol is not None:
        return compare(folded.reference, candidate, rtol=rtol)
    floor = storage_floor(folded, min(dtypes, key=lambda d: d.itemsize))
    base, rule = tolerance(folded.reference, None)
    return replace(compare(folded.reference, candidate, rtol=base + 2 * floor),
                   tolerance_rule=f"{rule} + 2 x {reduced[0]} storage floor ({floor:.2g})")


def storage_floor(folded: FoldedModel, dtype: torch.dtype) -> float:
    """Relative output change of the folded model when its weights are rounded to `dtype`."""
    from mobileone_cli.model import build_model
    from mobileone_cli.verify import torch_candidate

    spec = folded.loaded.spec.folded()
    rounded = {key: value.to(dtype).float() for key, value in folded.state.items()}
    exact = torch_candidate(folded.build())
    shifted = torch_candidate(build_model(spec, rounded))
    worst = max(float(abs(shifted(batch.array) - exact(batch.array)).max())
                for batch in folded.reference.batches)
    return worst / folded.reference.scale


def file_candidate(path: Path) -> Candidate:
    """The written file re-read and rebuilt: proof of the bytes, not of the tensors in memory."""
    return _candidate(_read(path))


def _read(path: Path) -> LoadedCheckpoint:
    from mobileone_cli.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _candidate(written: LoadedCheckpoint) -> Candidate:
    from mobileone_cli.model import build_model
    from mobileone_cli.verify import torch_candidate

    return torch_candidate(build_model(written.spec, written.state))

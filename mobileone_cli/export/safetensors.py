"""Folded weights as safetensors, in a peer's inference-mode key names."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from mobileone_cli.layouts import convert_key

if TYPE_CHECKING:
    import torch

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


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)

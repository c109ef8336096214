"""Exporters: one module per format, each with `export(model, path, *, options) -> Artifact`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobileone_cli.verify import Verification


@dataclass(frozen=True)
class Artifact:
    """One written file (or Core ML package folder) and its proof."""

    path: Path
    format: str
    sha256: str
    bytes: int
    verification: Verification | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "verification": self.verification.to_dict() if self.verification else None,
        }

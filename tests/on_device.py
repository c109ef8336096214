"""What the tests of the on-device backends (ExecuTorch, LiteRT, ORT format) share.

Models are folded from the seeded synthetic checkpoints at a small input size
(`SIZE`): the proof's figures do not depend on it, the converters' run time does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobileone_cli.checkpoint import load_checkpoint
from mobileone_cli.export.backend import WriteContext
from mobileone_cli.export.pipeline import FoldedModel, file_metadata, fold_and_prove
from mobileone_cli.proof.compare import compare
from mobileone_cli.proof.inputs import IMAGENET_MEAN, IMAGENET_STD
from mobileone_cli.results import Verification

SIZE = 64
CLASSIFIER_WEIGHT = "linear.weight"
TAMPERED_ROWS = 8
WRONG_OUTPUT = 1e-3
"""A tampered artifact's relative error must exceed this (a correct one sits near 1e-5)."""


@dataclass(frozen=True)
class Folded:
    """A folded, verified model and what the backends are given to write it."""

    variant: str
    folded: FoldedModel
    model: torch.nn.Module

    def context(self, *, options: Any = None, labels: bool = True) -> WriteContext:
        loaded = self.folded.loaded
        names = tuple(f"class {index}" for index in range(loaded.spec.num_classes or 0))
        return WriteContext(
            input_size=SIZE,
            output_name="logits" if loaded.spec.num_classes is not None else "features",
            metadata=file_metadata(loaded, layout=loaded.layout, input_size=SIZE,
                                   verification=self.folded.verification),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            labels=names if labels and names else None,
            options=options,
        )

    def prove(self, candidate: Any) -> Verification:
        """The pipeline's proof: the candidate against the train-time model at SIZE x SIZE."""
        return compare(self.folded.reference.restricted_to(SIZE, SIZE), candidate, rtol=None)

    def error_against_folded(self, candidate: Any) -> float:
        """max |candidate - folded torch model| / max |folded torch model| on the square batch."""
        batch = self.folded.reference.restricted_to(SIZE, SIZE).batches[0].array
        with torch.inference_mode():
            expected = self.model(torch.from_numpy(batch)).double().numpy()
        actual = np.asarray(candidate(batch), dtype=np.float64)
        return float(np.abs(actual - expected).max() / np.abs(expected).max())


def fold(checkpoint: Path, variant: str) -> Folded:
    folded = fold_and_prove(load_checkpoint(checkpoint), input_size=SIZE)
    return Folded(variant=variant, folded=folded, model=folded.build())


def negate_classifier_rows(path: Path, folded: Folded) -> None:
    """Flip the sign of the first rows of the classifier's weights where the file stores them.

    All three formats keep the (1000 x C) classifier matrix as-is, so its bytes
    are found, not guessed; the file stays structurally valid.
    """
    weight = folded.folded.state[CLASSIFIER_WEIGHT].numpy()[:TAMPERED_ROWS]
    needle = weight.astype("<f4").tobytes()
    data = bytearray(path.read_bytes())
    start = data.find(needle)
    assert start >= 0, f"{path.name} does not store the classifier's weights as-is"
    data[start : start + len(needle)] = (-weight).astype("<f4").tobytes()
    path.write_bytes(bytes(data))


def assert_tampering_is_caught(backend: Any, path: Path, folded: Folded, folder: Path) -> None:
    """A copy of `path` with classifier rows negated fails the proof, and `verify` exits 3."""
    import json

    from click.testing import CliRunner

    from mobileone_cli.cli import main

    tampered = folder / f"tampered{path.suffix}"
    tampered.write_bytes(path.read_bytes())
    negate_classifier_rows(tampered, folded)
    verification = folded.prove(backend.open(tampered))
    assert verification.max_rel_diff > WRONG_OUTPUT
    assert not verification.passed
    # And through `verify`, as a release pipeline runs it: exit 3, the figures in the JSON.
    result = CliRunner().invoke(main, ["verify", str(tampered), "--against",
                                       str(folded.folded.loaded.source), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 3 and report["passed"] is False
    assert report["verification"]["max_rel_diff"] > WRONG_OUTPUT

"""Shared fixtures: generated checkpoints and the reference-data folder."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `fixtures` and `tests.faults` import from the checkout

from fixtures.digits import Digits  # noqa: E402
from fixtures.digits import build as build_digits  # noqa: E402
from fixtures.generate import canonical_state, state_in_layout  # noqa: E402

REFERENCE = Path(os.environ.get("MOBILEONE_REFERENCE", ROOT.parent / "shared" / "reference"))

CheckpointFactory = Callable[..., Path]

# The suite runs on two pytest-xdist workers (one per core of the CI machine);
# more than one torch thread per worker oversubscribes the cores, and idle torch
# threads spin: measured here, a 0.7 s reference run took 11-33 s that way.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "index.json").exists():
        pytest.skip(f"reference data not found at {REFERENCE} (set MOBILEONE_REFERENCE to the "
                    "folder with index.json to run the checks against the peers' own models)")
    return REFERENCE


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """Write (once per session) a seeded train-time checkpoint; returns its path."""
    folder = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple[object, ...], Path] = {}

    def make(variant: str = "s0", layout: str = "apple", *, num_classes: int | None = 1000,
             seed: int = 0, wrapper: str | None = None, suffix: str = ".pth") -> Path:
        key = (variant, layout, num_classes, seed, wrapper, suffix)
        if key not in made:
            state = state_in_layout(canonical_state(variant, num_classes=num_classes, seed=seed,
                                                    layout=layout), layout)
            path = folder / f"{layout}_{variant}_{num_classes}_{seed}_{wrapper}{suffix}"
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(state, str(path))
            else:
                torch.save({wrapper: state, "epoch": 1} if wrapper else state, path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def s0_checkpoint(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint("s0", "apple")


@pytest.fixture(scope="session")
def digits() -> Digits:
    """The MobileOne trained on scikit-learn's digits (about a minute once; cached on disk)."""
    return build_digits()

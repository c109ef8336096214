"""A written safetensors file is proven by its tensors, bit for bit, not by a second run;
a file whose tensors differ is still run. And the cheap checks the speed work relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mobileone_cli import api
from mobileone_cli.export.pipeline import HOLDS_ROUNDED, HOLDS_THE_FOLD
from mobileone_cli.export.safetensors import serialize, write_file
from mobileone_cli.options import FoldOptions, Gates, VerifyOptions
from mobileone_cli.proof.compare import bit_identical, replayed
from mobileone_cli.proof.inputs import default_inputs
from mobileone_cli.validation import all_finite

SIZE = 64


def test_bit_identical_needs_the_same_keys_dtypes_and_bits() -> None:
    verified = {"a": torch.tensor([1.0, -2.5, 3.0]), "b": torch.zeros(2, 2)}
    assert bit_identical({k: v.clone() for k, v in verified.items()}, verified, dtype="float32")
    assert not bit_identical({"a": verified["a"]}, verified, dtype="float32")
    flipped = verified["a"].clone()
    flipped.view(torch.int32)[0] ^= 1  # the last bit of the mantissa
    assert not bit_identical({**verified, "a": flipped}, verified, dtype="float32")
    negative_zero = {**verified, "b": -torch.zeros(2, 2)}  # equal values, other bits
    assert not bit_identical(negative_zero, verified, dtype="float32")
    for dtype in ("float16", "bfloat16"):
        rounded = {k: v.to(getattr(torch, dtype)) for k, v in verified.items()}
        assert bit_identical(rounded, verified, dtype=dtype)
        assert not bit_identical(rounded, verified, dtype="float32")


def test_replayed_gives_back_the_recorded_output_of_the_same_array_only() -> None:
    batches = default_inputs(32)
    outputs = tuple(np.full((len(batch.array), 3), index, np.float32)
                    for index, batch in enumerate(batches))
    run = replayed(batches, outputs)
    assert run(batches[1].array) is outputs[1]
    with pytest.raises(ValueError, match="no output was recorded"):
        run(batches[1].array.copy())


def test_all_finite_checks_every_float_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        values = torch.ones(3, 3, dtype=dtype)
        assert all_finite(values)
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = values.clone()
            broken[1, 2] = bad
            assert not all_finite(broken)
    assert all_finite(torch.tensor([1, 2, 3]))


def test_the_streamed_file_is_the_bytes_of_serialize(tmp_path: Path) -> None:
    state = {"stage0.reparam_conv.weight": torch.randn(4, 3, 3, 3),
             "stage0.reparam_conv.bias": torch.randn(4)}
    metadata = {"z": "last", "a": "first", "mobileone.layout": "apple"}
    for layout in ("apple", "timm", "mmpretrain"):
        path = tmp_path / f"{layout}.safetensors"
        write_file(state, path, layout=layout, metadata=metadata)
        assert path.read_bytes() == serialize(state, layout=layout, metadata=metadata)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_written_file_is_proven_by_its_tensors(s0_checkpoint: Path, tmp_path: Path,
                                                 dtype: str) -> None:
    out = tmp_path / "s0.safetensors"
    result = api.fold(FoldOptions(checkpoint=s0_checkpoint, output=out, input_size=SIZE,
                                  dtype=dtype, gates=Gates(min_cosine=0, min_agreement=0)))
    assert result.passed and result.written
    [artifact] = result.artifacts
    written = artifact.verification
    assert written is not None and written.passed
    if dtype == "float32":
        # The file holds the proven fold's tensors, so its figures are that fold's own.
        assert written.reference == f"train-time fp32{HOLDS_THE_FOLD}"
        assert written.max_abs_diff == result.fold_verification.max_abs_diff
        assert written.cosine_similarity == result.fold_verification.cosine_similarity
    else:
        assert written.reference == f"folded model with float16 weights{HOLDS_ROUNDED}"
        assert written.max_abs_diff == 0.0
        assert artifact.cost is not None and artifact.cost.worst_cosine > 0.99
    # verify re-folds the checkpoint and finds the same tensors.
    check = api.verify(VerifyOptions(artifact=out, against=s0_checkpoint, input_size=SIZE,
                                     gates=Gates(min_cosine=0, min_agreement=0)))
    assert check.artifact.verification is not None
    assert check.artifact.verification.reference == written.reference


def test_a_file_whose_tensors_differ_is_run(s0_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "s0.safetensors"
    assert api.fold(FoldOptions(checkpoint=s0_checkpoint, output=out, input_size=SIZE)).passed
    tensors = load_file(str(out))
    # One ulp of one bias: not the fold's tensors, but still a correct model.
    tensors["linear.bias"].view(torch.int32)[0] ^= 1
    nudged = tmp_path / "nudged.safetensors"
    save_file(tensors, str(nudged), metadata={"format": "pt"})
    check = api.verify(VerifyOptions(artifact=nudged, against=s0_checkpoint, input_size=SIZE))
    verification = check.artifact.verification
    assert verification is not None and verification.passed
    assert verification.reference == "train-time fp32"  # run, not taken from the fold
    tensors["linear.bias"] = -tensors["linear.bias"] * 100
    save_file(tensors, str(nudged), metadata={"format": "pt"})
    check = api.verify(VerifyOptions(artifact=nudged, against=s0_checkpoint, input_size=SIZE))
    assert check.artifact.verification is not None
    assert not check.artifact.verification.passed


def test_help_imports_none_of_the_dataclass_modules() -> None:
    code = ("import sys, mobileone_cli.cli; "
            "print(sorted(name for name in sys.modules if name.startswith('mobileone_cli')))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True)
    assert completed.stdout.strip() == str(sorted(
        ["mobileone_cli", "mobileone_cli.cli", "mobileone_cli.defaults", "mobileone_cli.errors"]))

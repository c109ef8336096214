"""Hostile torch archives are refused, in one line, before anything large is inflated.

Each case is built from a valid tiny checkpoint by fixtures/hostile.py; the limits are
lowered with monkeypatch where the real ones would need gigabytes (benchmarks/hostile.py
measures those).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fixtures.hostile import flip_bit, oversized_tensor_record, zip_bomb
from mobileone_cli import reader
from mobileone_cli.cli import main
from mobileone_cli.errors import BadCheckpointError
from mobileone_cli.reader import check_archive, read_checkpoint, storage_sizes


def weights() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(6.0), "b": torch.zeros(2, 2, dtype=torch.float16),
            "c": torch.ones(3, dtype=torch.bfloat16), "d": torch.tensor(7)}


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": weights(), "epoch": 3}, path)
    return path


def refused(path: Path) -> str:
    with pytest.raises(BadCheckpointError) as caught:
        read_checkpoint(path)
    assert "\n" not in caught.value.message and caught.value.hint
    return caught.value.message


def test_storage_sizes_are_read_from_the_pickle_without_unpickling(valid: Path) -> None:
    with zipfile.ZipFile(valid) as archive:
        data = archive.read("ckpt/data.pkl")
    assert sorted(size or 0 for size in storage_sizes(data).values()) == [3 * 2, 4 * 2, 8, 6 * 4]


def test_a_shared_storage_is_counted_once(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    path = tmp_path / "shared.pth"
    torch.save({"whole": base, "view": base[2:5]}, path)
    assert check_archive(path).tensor_bytes == 40


def test_a_valid_archive_passes_and_loads(valid: Path) -> None:
    scan = check_archive(valid)
    assert scan.tensor_bytes == 24 + 8 + 6 + 8
    assert set(read_checkpoint(valid).state) == {"a", "b", "c", "d"}


def test_a_pickle_over_its_bound_is_refused_before_inflating(
        valid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "PICKLE_CEILING", 4096)
    bomb = zip_bomb(valid, tmp_path / "bomb.pth", pickle_bytes=8192)
    assert refused(bomb) == (f"{bomb} is truncated or not a checkpoint (record ckpt/data.pkl "
                             "declares 8,192 bytes, over the 4,096-byte bound of a checkpoint's "
                             "pickle)")


def test_a_tensor_record_larger_than_its_tensors_is_refused(valid: Path, tmp_path: Path) -> None:
    lying = oversized_tensor_record(valid, tmp_path / "big.pth", record_bytes=10**6)
    needed = storage_sizes(zipfile.ZipFile(valid).read("ckpt/data.pkl"))["0"]
    assert refused(lying) == (f"{lying} is truncated or not a checkpoint (record ckpt/data/0 "
                              f"declares 1,000,000 bytes, its tensors need {needed:,})")


def test_tensors_over_the_ceiling_are_refused(valid: Path) -> None:
    with pytest.raises(BadCheckpointError, match="over the 10-byte ceiling"):
        check_archive(valid, tensor_ceiling=10)


def test_a_flipped_bit_in_a_stored_record_is_refused(valid: Path) -> None:
    flip_bit(valid)
    assert refused(valid) == (f"{valid} is truncated or not a checkpoint (record ckpt/data/0 "
                              "fails its CRC-32 check: its bytes changed)")


def test_an_unreferenced_large_record_is_refused(valid: Path, tmp_path: Path) -> None:
    path = tmp_path / "extra.pth"
    with zipfile.ZipFile(valid) as original, zipfile.ZipFile(path, "w") as archive:
        for info in original.infolist():
            archive.writestr(info, original.read(info))
        archive.writestr("ckpt/data/99", bytes(2 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert "record ckpt/data/99 declares 2,097,152 bytes, the bound of a record no tensor " \
           "refers to is 1,048,576" in refused(path)


def test_a_damaged_pickle_is_refused_in_one_line(valid: Path, tmp_path: Path) -> None:
    path = tmp_path / "damaged.pth"
    with zipfile.ZipFile(valid) as original, zipfile.ZipFile(path, "w") as archive:
        for info in original.infolist():
            data = original.read(info)
            archive.writestr(info, pickle.dumps([1])[:-3] if info.filename.endswith(".pkl")
                             else data)
    refused(path)


def test_inspect_of_a_zip_bomb_exits_1_in_one_line_and_writes_nothing(
        valid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "PICKLE_CEILING", 4096)
    bomb = zip_bomb(valid, tmp_path / "bomb.pth", pickle_bytes=1 << 20)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["inspect", str(bomb)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        result.stderr.splitlines()[0]]
    assert sorted(tmp_path.rglob("*")) == before

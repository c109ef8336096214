"""reader.py: safe loading, unwrapping and prefix stripping of checkpoint files."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import pickle
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mobileone_cli.errors import BadCheckpointError, UsageError
from mobileone_cli.files import sha256_path
from mobileone_cli.reader import RawCheckpoint, _InertPlaceholder, read_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def weights(prefix: str = "", offset: float = 0.0) -> dict[str, torch.Tensor]:
    """A tiny state dict; `offset` tells plain and EMA copies apart."""
    return {
        f"{prefix}stem.conv.weight": torch.arange(8.0).reshape(2, 1, 2, 2) + offset,
        f"{prefix}stem.bn.running_mean": torch.zeros(2) + offset,
        f"{prefix}stem.bn.num_batches_tracked": torch.tensor(7),
    }


def save(tmp_path: Path, obj: object, name: str = "ckpt.pth", *, legacy: bool = False) -> Path:
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(state) == list(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype
        assert torch.equal(state[key], tensor)


def refusal(path: Path, **options: bool) -> BadCheckpointError:
    with pytest.raises(BadCheckpointError) as caught:
        read_checkpoint(path, **options)
    assert "\n" not in caught.value.message
    assert caught.value.hint
    return caught.value


@contextmanager
def fake_module_class(module: str, qualname: str, base: type = object) -> Iterator[type]:
    """A class that claims to live in `module`, importable only inside the block."""
    parts = module.split(".")
    names = [".".join(parts[: index + 1]) for index in range(len(parts))]
    cls = type(qualname, (base,), {"__module__": module, "__qualname__": qualname})
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    setattr(sys.modules[module], qualname, cls)
    try:
        yield cls
    finally:
        for name in names:
            del sys.modules[name]


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_bare_state_dict(tmp_path: Path, legacy: bool) -> None:
    path = save(tmp_path, weights(), legacy=legacy)
    raw = read_checkpoint(path)
    assert_same(raw.state, weights())
    assert raw.file_format == ("torch-legacy" if legacy else "torch-zip")
    assert raw.path == path
    assert (raw.container_key, raw.stripped_prefixes, raw.skipped_extras) == (None, (), ())
    assert (raw.metadata, raw.has_ema) == ({}, False)


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.pth.tar", "no_extension"])
def test_format_comes_from_content_not_extension(tmp_path: Path, name: str) -> None:
    raw = read_checkpoint(save(tmp_path, weights(), name))
    assert raw.file_format == "torch-zip"
    assert_same(raw.state, weights())


def test_safetensors_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(weights("module."), str(path), metadata={"format": "pt", "variant": "s0"})
    raw = read_checkpoint(path)
    assert raw.file_format == "safetensors"
    assert raw.metadata == {"format": "pt", "variant": "s0"}
    assert raw.stripped_prefixes == ("module.",)
    assert sorted(raw.state) == sorted(weights())
    for key, tensor in weights().items():
        assert torch.equal(raw.state[key], tensor)


def test_safetensors_named_pth_is_read_as_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_file(weights(), str(path))
    assert read_checkpoint(path).file_format == "safetensors"


def test_dtypes_are_kept(tmp_path: Path) -> None:
    state = {"half": torch.ones(2, dtype=torch.float16),
             "brain": torch.ones(2, dtype=torch.bfloat16),
             "count": torch.tensor([3], dtype=torch.int64)}
    assert_same(read_checkpoint(save(tmp_path, state)).state, state)


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    path = save(tmp_path, weights())
    assert read_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_path_streams_across_chunks(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 5)  # three chunks and a tail
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_path(path) == hashlib.sha256(data).hexdigest()


def test_raw_checkpoint_is_frozen(tmp_path: Path) -> None:
    raw = read_checkpoint(save(tmp_path, weights()))
    assert isinstance(raw, RawCheckpoint)
    with pytest.raises(dataclasses.FrozenInstanceError):
        raw.sha256 = "changed"  # type: ignore[misc]


def test_importing_the_reader_does_not_import_torch() -> None:
    code = "import sys, mobileone_cli.reader; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


# --- containers ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["state_dict", "model", "module"])
def test_state_dict_under_a_container_key(tmp_path: Path, key: str) -> None:
    checkpoint = {key: weights(), "epoch": 3, "optimizer": {"state": {}, "param_groups": []},
                  "meta": {"note": "x"}, "best_acc": torch.tensor(0.8)}
    raw = read_checkpoint(save(tmp_path, checkpoint))
    assert raw.container_key == key
    assert_same(raw.state, weights())  # the wrapper's own `best_acc` tensor is not a weight


@pytest.mark.parametrize(("checkpoint", "container"), [
    ({"model": {"state_dict": weights()}}, "model.state_dict"),
    ({"state_dict": {"model": {"module": weights()}}, "epoch": 1}, "state_dict.model.module"),
])
def test_nested_containers(tmp_path: Path, checkpoint: dict[str, Any], container: str) -> None:
    raw = read_checkpoint(save(tmp_path, checkpoint))
    assert raw.container_key == container
    assert_same(raw.state, weights())


def test_non_tensor_entries_of_a_state_dict_are_dropped(tmp_path: Path) -> None:
    noisy = {**weights(), "_metadata": {"": {"version": 1}}, "note": "hello", "step": 3}
    assert_same(read_checkpoint(save(tmp_path, {"state_dict": noisy})).state, weights())


@pytest.mark.parametrize("checkpoint", [
    {"epoch": 3, "optimizer": {}, "meta": {"config": "x"}},
    {"model": {"arch": "s0"}, "epoch": 3},
])
def test_no_state_dict_lists_the_top_level_keys(tmp_path: Path, checkpoint: dict[str, Any]) -> None:
    path = save(tmp_path, checkpoint)
    error = refusal(path)
    assert error.message == f"{path} holds no state dict (top-level keys: {', '.join(checkpoint)})"


def test_a_list_is_not_a_state_dict(tmp_path: Path) -> None:
    path = save(tmp_path, [torch.ones(2)])
    assert refusal(path).message == (
        f"{path} holds no state dict (top-level keys: none, it holds a list)")


# --- EMA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ema_key", ["state_dict_ema", "model_ema", "ema_state_dict"])
def test_plain_weights_are_the_default_and_ema_is_chosen_on_request(tmp_path: Path,
                                                                     ema_key: str) -> None:
    path = save(tmp_path, {"state_dict": weights(), ema_key: weights(offset=1.0), "epoch": 9})
    plain = read_checkpoint(path)
    averaged = read_checkpoint(path, ema=True)
    assert (plain.container_key, plain.has_ema) == ("state_dict", True)
    assert_same(plain.state, weights())
    assert (averaged.container_key, averaged.has_ema) == (ema_key, True)
    assert_same(averaged.state, weights(offset=1.0))


def test_ema_copy_with_its_own_prefix(tmp_path: Path) -> None:
    checkpoint = {"model": weights(), "model_ema": weights("module.", offset=1.0)}
    raw = read_checkpoint(save(tmp_path, checkpoint), ema=True)
    assert raw.stripped_prefixes == ("module.",)
    assert_same(raw.state, weights(offset=1.0))


def test_asking_for_ema_without_one_is_a_usage_error(tmp_path: Path) -> None:
    path = save(tmp_path, {"state_dict": weights(), "epoch": 3, "optimizer": {}})
    with pytest.raises(UsageError) as caught:
        read_checkpoint(path, ema=True)
    assert caught.value.message == f"{path} has no EMA weights"
    assert caught.value.hint is not None
    assert "state_dict, epoch, optimizer" in caught.value.hint


def test_a_file_with_only_an_ema_copy_uses_it_and_says_so(tmp_path: Path) -> None:
    raw = read_checkpoint(save(tmp_path, {"state_dict_ema": weights(), "epoch": 3}))
    assert (raw.container_key, raw.has_ema) == ("state_dict_ema", False)
    assert_same(raw.state, weights())


# --- prefixes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "stripped"), [
    ("module.", ("module.",)),
    ("_orig_mod.", ("_orig_mod.",)),
    ("model.", ("model.",)),
    ("encoder.", ("encoder.",)),
    ("module._orig_mod.", ("module.", "_orig_mod.")),
])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str,
                                       stripped: tuple[str, ...]) -> None:
    raw = read_checkpoint(save(tmp_path, {"state_dict": weights(prefix)}))
    assert raw.stripped_prefixes == stripped
    assert_same(raw.state, weights())


def test_backbone_prefix_is_kept(tmp_path: Path) -> None:
    raw = read_checkpoint(save(tmp_path, weights("module.backbone.")))
    assert raw.stripped_prefixes == ("module.",)
    assert_same(raw.state, weights("backbone."))


def test_a_prefix_only_some_keys_share_is_kept(tmp_path: Path) -> None:
    state = {**weights("module."), "head.fc.weight": torch.ones(1)}
    raw = read_checkpoint(save(tmp_path, state))
    assert raw.stripped_prefixes == ()
    assert_same(raw.state, state)


# --- harmless extras -----------------------------------------------------------------------


def _qualified(function: Any) -> str:
    return f"{function.__module__}.{function.__name__}"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_training_args_namespace_loads(tmp_path: Path, legacy: bool) -> None:
    args = argparse.Namespace(lr=0.1, output=pathlib.PosixPath("/runs/s0"))
    raw = read_checkpoint(save(tmp_path, {"state_dict": weights(), "args": args}, legacy=legacy))
    assert_same(raw.state, weights())
    assert raw.skipped_extras == ("argparse.Namespace", _qualified(pathlib.PosixPath))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_numpy_values_load(tmp_path: Path, legacy: bool) -> None:
    extras = {"best": np.float64(0.5), "step": np.int64(3), "curve": np.arange(4.0),
              "dtype": np.dtype("float32")}
    raw = read_checkpoint(save(tmp_path, {"state_dict": weights(), **extras}, legacy=legacy))
    assert_same(raw.state, weights())
    scalar = _qualified(np.float64(0.5).__reduce__()[0])  # numpy.core or numpy._core
    assert {scalar, "numpy.dtype", "numpy.ndarray"} <= set(raw.skipped_extras)
    assert all(name.startswith("numpy.") for name in raw.skipped_extras)
    assert list(raw.skipped_extras) == sorted(raw.skipped_extras)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_mmengine_message_hub_loads_without_mmengine(tmp_path: Path, legacy: bool) -> None:
    with fake_module_class("mmengine.logging.message_hub", "MessageHub") as hub_class:
        hub = hub_class()
        hub.log_scalars = {"loss": np.arange(3.0)}
        path = save(tmp_path, {"meta": {"epoch": 1}, "state_dict": weights(),
                               "message_hub": hub}, legacy=legacy)
    assert "mmengine" not in sys.modules
    raw = read_checkpoint(path)
    assert_same(raw.state, weights())
    assert "mmengine.logging.message_hub.MessageHub" in raw.skipped_extras


def test_mmengine_config_dict_loads(tmp_path: Path) -> None:
    # A dict subclass: pickle fills it with SETITEMS, which torch allows only on real dicts.
    with fake_module_class("mmengine.config.config", "ConfigDict", base=dict) as config_class:
        config = config_class(model={"type": "MobileOne"}, lr=0.1)
        path = save(tmp_path, {"state_dict": weights(), "meta": {"cfg": config}})
    raw = read_checkpoint(path)
    assert raw.skipped_extras == ("mmengine.config.config.ConfigDict",)
    assert_same(raw.state, weights())


def test_placeholder_accepts_anything_and_keeps_nothing() -> None:
    placeholder = _InertPlaceholder(1, "two", three=3)
    placeholder.__setstate__({"payload": "x"})
    placeholder(4, five=5)  # calling an instance does nothing either
    assert not hasattr(placeholder, "__dict__")


# --- refused files -------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of os.system; unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_the_payload_is_live(tmp_path: Path) -> None:
    # Proves the tests below would notice: an unsafe load does run it.
    marker = tmp_path / "MARKER"
    torch.load(save(tmp_path, {"state_dict": weights(), "x": _Payload(marker)}),
               weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "MARKER"
    path = save(tmp_path, {"state_dict": weights(), "x": _Payload(marker)}, legacy=legacy)
    error = refusal(path)
    assert error.message == (f"{path} refers to code mobileone will not load "
                             f"({_qualified(os.system)}); nothing in the file was executed")
    assert not marker.exists()


def test_zip_refusal_names_every_unsafe_global(tmp_path: Path) -> None:
    # torch's own refusal stops at the first global; the up-front scan names them all.
    marker = tmp_path / "MARKER"
    path = save(tmp_path, {"state_dict": weights(), "a": _Evaluate(), "b": _Payload(marker)})
    assert f"(builtins.eval, {_qualified(os.system)})" in refusal(path).message
    assert not marker.exists()


class _Evaluate:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return eval, ("1 + 1",)


class _Spawn:
    def __reduce__(self) -> tuple[Any, tuple[list[str]]]:
        return subprocess.Popen, (["true"],)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(("payload", "name"), [
    (_Evaluate(), "builtins.eval"),
    (_Spawn(), None),  # pickled under whichever module exports Popen first
    (argparse.ArgumentParser, "argparse.ArgumentParser"),  # only Namespace is allowed
])
def test_other_globals_are_refused_by_name(tmp_path: Path, legacy: bool, payload: object,
                                           name: str | None) -> None:
    path = save(tmp_path, {"state_dict": weights(), "x": payload}, legacy=legacy)
    error = refusal(path)
    assert "refers to code mobileone will not load" in error.message
    assert (name or ".Popen") in error.message


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("model", [torch.nn.Conv2d(1, 2, 1), _Model()], ids=["torch", "custom"])
def test_pickled_model_is_refused_with_the_state_dict_hint(tmp_path: Path, legacy: bool,
                                                           model: torch.nn.Module) -> None:
    path = save(tmp_path, model, legacy=legacy)
    error = refusal(path)
    assert error.message.startswith(f"{path} holds a pickled model object (torch.nn.modules.")
    assert error.message.endswith("not a state dict; nothing in the file was executed")
    assert error.hint is not None
    assert "model.state_dict()" in error.hint


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    assert refusal(path).message == f"{path} is a TorchScript archive, not a checkpoint"


def test_pickle_protocol_the_safe_loader_cannot_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(weights(), path, pickle_protocol=4)
    assert refusal(path).message.startswith(f"{path} cannot be read safely (")


# --- damaged files -------------------------------------------------------------------------


def test_truncated_zip(tmp_path: Path) -> None:
    path = save(tmp_path, {"state_dict": weights(), "epoch": 3})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    error = refusal(path)
    assert error.message == f"{path} is truncated or not a checkpoint (zip archive is incomplete)"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_truncation_is_one_clean_error(tmp_path: Path, legacy: bool) -> None:
    extras = {"args": argparse.Namespace(lr=0.1), "best": np.float64(0.5)}
    data = save(tmp_path, {"state_dict": weights(), **extras}, legacy=legacy).read_bytes()
    cut = tmp_path / "cut.pth"
    for length in range(1, len(data), 3):
        cut.write_bytes(data[:length])
        message = refusal(cut).message
        assert "truncated or not a checkpoint" in message or "is not a PyTorch" in message


def test_truncated_legacy_pickle(tmp_path: Path) -> None:
    path = save(tmp_path, weights(), legacy=True)
    path.write_bytes(path.read_bytes()[:60])  # inside the pickled object
    assert refusal(path).message == (
        f"{path} is truncated or not a checkpoint (pickle stream ends early)")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    path.touch()
    assert refusal(path).message == f"{path} is empty"


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"these bytes are no checkpoint at all\n" * 4)
    assert refusal(path).message == (
        f"{path} is not a PyTorch or safetensors checkpoint (unrecognised content)")


@pytest.mark.parametrize(("make", "reason"), [
    (lambda path: None, "No such file or directory"),
    (lambda path: path.mkdir(), "Is a directory"),
])
def test_missing_path_or_directory(tmp_path: Path, make: Any, reason: str) -> None:
    path = tmp_path / "ckpt.pth"
    make(path)
    assert refusal(path).message == f"cannot read {path} ({reason})"


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert refusal(path).message.startswith(f"{path} is truncated or not a checkpoint (unreadable zip")


def test_plain_pickle_is_not_a_torch_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert refusal(path).message.startswith(f"{path} is truncated or not a checkpoint (torch ")


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [2], '  # cut-off JSON
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert refusal(path).message.startswith(f"{path} is not a valid safetensors file (")


def test_truncated_safetensors_data(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(weights(), str(path))
    path.write_bytes(path.read_bytes()[:-8])
    assert refusal(path).message.startswith(f"{path} is not a valid safetensors file (")


def test_ema_on_a_safetensors_file_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(UsageError, match="has no EMA weights"):
        read_checkpoint(path, ema=True)

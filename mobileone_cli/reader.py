"""Read a checkpoint file safely and return the flat tensor state dict it holds.

Nothing in a file may run code: its pickle opcodes are read to list every global it
names, then torch's weights-only unpickler loads it. Harmless extras (training args,
numpy values, mmengine logs) become inert stand-ins; any other global refuses the file.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobileone_cli.errors import BadCheckpointError, UsageError, printable
from mobileone_cli.files import CHUNK, sha256_path

if TYPE_CHECKING:
    import torch

    StateDict = dict[str, torch.Tensor]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_PLAIN_KEYS = ("state_dict", "model", "module")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict")
_MAX_DEPTH = 3
# `backbone.` is not here: it is part of the OpenMMLab layout, not a wrapper.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.")
_EXTRA_NAMES = frozenset({
    "argparse.Namespace", "pathlib.PosixPath", "pathlib.WindowsPath",
    "pathlib._local.PosixPath", "pathlib._local.WindowsPath",  # their module since Python 3.13
})
_EXTRA_PREFIXES = ("numpy.", "mmengine.")
# torch fills only real dicts from SETITEMS, so dict subclasses need a dict stand-in.
_MAPPING_EXTRAS = frozenset({"mmengine.config.config.ConfigDict"})
_MODEL_PREFIX = "torch.nn.modules."
_REFUSED_GLOBAL = re.compile(r"GLOBAL (.+?) (?:was not an allowed global|whose module)", re.DOTALL)
_FETCH_AGAIN = "the download or copy may have failed; fetch the file again"
_SAVE_STATE_DICT = "save the weights with torch.save(model.state_dict(), path) and pass that file"


@dataclass(frozen=True)
class RawCheckpoint:
    """The tensors of a checkpoint file and where in the file they were found."""

    path: Path
    sha256: str
    file_format: str
    state: StateDict
    container_key: str | None
    stripped_prefixes: tuple[str, ...]
    skipped_extras: tuple[str, ...]
    metadata: dict[str, str]
    has_ema: bool


class _InertPlaceholder:
    """Stands in for an allowed pickled global: takes any arguments, keeps and does nothing.

    No `__new__` is needed: object.__new__ ignores extra arguments when `__init__` is overridden.
    """

    __slots__ = ()

    def __init__(self, *args: object, **kwargs: object) -> None: ...
    def __setstate__(self, state: object) -> None: ...
    def __call__(self, *args: object, **kwargs: object) -> None: ...


def read_checkpoint(path: Path, *, ema: bool = False) -> RawCheckpoint:
    """Read `path` without running anything in it and return its flat state dict.

    Raises BadCheckpointError for a missing, damaged, unsafe or weightless file, and
    UsageError when `ema` asks for an EMA copy the file does not hold.
    """
    file_format = _detect_format(path)
    extras: tuple[str, ...] = ()
    metadata: dict[str, str] = {}
    container, has_ema = None, False
    # Hashed on a second thread while this one checks and reads the file (hashlib releases
    # the GIL): a 60 MB checkpoint's 45 ms of hashing leave the critical path.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mobileone-sha256") as pool:
        digest = pool.submit(sha256_path, path)
        if file_format == "safetensors":  # never pickled, never wrapped
            if ema:
                raise UsageError(f"{path} has no EMA weights",
                                 hint="a safetensors file holds one set of weights; drop --ema")
            state, metadata = _read_safetensors(path)
        else:
            loaded, extras = _load_torch(path, zipped=file_format == "torch-zip")
            state, container, has_ema = _unwrap(loaded, path=path, ema=ema)
        sha256 = digest.result()
    state, prefixes = _strip_prefixes(state)
    return RawCheckpoint(path=path, sha256=sha256, file_format=file_format, state=state,
                         container_key=container, stripped_prefixes=prefixes,
                         skipped_extras=extras, metadata=metadata, has_ema=has_ema)


def _detect_format(path: Path) -> str:
    """Name the format from the first bytes; extensions lie (.bin, .pth.tar, renamed files)."""
    try:
        with path.open("rb") as stream:
            head = stream.read(9)
    except OSError as error:  # missing, a directory, no permission...
        raise BadCheckpointError(f"cannot read {path} ({error.strerror})",
                                 hint="check the path and the file's permissions") from None
    if not head:
        raise BadCheckpointError(f"{path} is empty", hint=_FETCH_AGAIN)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    # Before the pickle test: one safetensors header length in 256 starts with byte 0x80, while
    # byte 8 of a legacy torch file is always 0xf9 (inside the pickled magic number).
    if head[8:9] == b"{":  # 8-byte little-endian header length, then the JSON header
        return "safetensors"
    if head[0] == _PICKLE_PROTO:
        return "torch-legacy"
    if lfs_pointer(path):
        raise BadCheckpointError(f"{path} is a Git LFS pointer, not the checkpoint itself",
                                 hint="run `git lfs pull` to fetch the file")
    raise BadCheckpointError(
        f"{path} is not a PyTorch or safetensors checkpoint (unrecognised content)",
        hint="mobileone reads files written by torch.save (.pth, .pth.tar, .pt, .bin) "
             "and .safetensors files")


LFS_POINTER_START = b"version https://git-lfs.github.com/spec/"


def lfs_pointer(path: Path) -> bool:
    """Whether `path` is a Git LFS pointer (a clone without `git lfs pull`), not the file."""
    try:
        with path.open("rb") as stream:
            head = stream.read(512)  # a pointer is about 130 bytes
    except OSError:
        return False
    return head.startswith(LFS_POINTER_START) and b"\noid sha256:" in head


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = handle.keys()
            state = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise BadCheckpointError(f"{path} is not a valid safetensors file ({error})",
                                 hint=_FETCH_AGAIN) from None
    return state, metadata


def _load_torch(path: Path, *, zipped: bool) -> tuple[Any, tuple[str, ...]]:
    """torch.load with weights_only, allowed extras registered as inert stand-ins."""
    import torch

    if zipped:
        check_archive(path)
    found = _zip_globals(path) if zipped else _legacy_globals(path)
    extras = sorted(name for name in found
                    if name in _EXTRA_NAMES or name.startswith(_EXTRA_PREFIXES))
    # torch's zip scan lists only what it would refuse, so all of it can be named up front;
    # the legacy scan lists every global, and torch names the first it refuses.
    refused = sorted(found - set(extras)) if zipped else []
    if refused:
        raise _unsafe(path, refused)
    stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (OrderedDict if name in _MAPPING_EXTRAS else _InertPlaceholder, name) for name in extras]
    try:
        with torch.serialization.safe_globals(stand_ins), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        match = _REFUSED_GLOBAL.search(str(error))
        if match is None:
            raise _unreadable(path, _reason(error)) from None
        name = match.group(1) if "." in match.group(1) else f"builtins.{match.group(1)}"
        models = {other for other in found if other.startswith(_MODEL_PREFIX)}
        raise _unsafe(path, sorted({name} | models)) from None
    except Exception as error:  # noqa: BLE001 - damaged files raise all kinds; none is a bug here
        raise _corrupt(path, f"torch {type(error).__name__}: {_reason(error)}") from None
    return loaded, tuple(extras)


def _zip_globals(path: Path) -> set[str]:
    """Globals torch would refuse, found by reading pickle opcodes, never by unpickling."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        return set(get_unsafe_globals_in_checkpoint(path))
    except ValueError as error:
        if "torchscript" in str(error):
            raise BadCheckpointError(f"{path} is a TorchScript archive, not a checkpoint",
                                     hint=_SAVE_STATE_DICT) from None
        raise _corrupt(path, _reason(error)) from None
    except RuntimeError as error:  # from miniz: a cut-off archive, or a zip torch did not write
        cut_off = "central directory" in str(error)
        detail = "zip archive is incomplete" if cut_off else f"unreadable zip: {_reason(error)}"
        raise _corrupt(path, detail) from None
    except (pickle.UnpicklingError, EOFError) as error:
        # The scanner knows the same opcodes as the weights-only unpickler, so it would fail too.
        raise _unreadable(path, _reason(error)) from None


def _legacy_globals(path: Path) -> set[str]:
    """Every global in the four pickles of a non-zip torch file (torch scans only zip files).

    Scanning first also catches truncation, which torch would report as a refused global.
    """
    found = set()
    with path.open("rb") as stream:
        for _ in range(4):
            if not stream.peek(1):
                break  # fewer pickles than torch.save writes: torch.load says what is wrong
            try:
                for opcode, argument, _ in pickletools.genops(stream):
                    if opcode.name in ("GLOBAL", "INST"):  # argument is "module name"
                        found.add(str(argument).replace(" ", "."))
            except (ValueError, MemoryError):  # MemoryError: a damaged length field
                detail = "pickle stream ends early" if not stream.peek(1) else "damaged pickle"
                raise _corrupt(path, detail) from None
    return found


def _unsafe(path: Path, names: list[str]) -> BadCheckpointError:
    models = [name for name in names if name.startswith(_MODEL_PREFIX)]
    if models:
        return BadCheckpointError(
            f"{path} holds a pickled model object ({_listing(models)}), not a state dict; "
            "nothing in the file was executed",
            hint="load it where its class is defined and " + _SAVE_STATE_DICT)
    return BadCheckpointError(
        f"{path} refers to code mobileone will not load ({_listing(names)}); "
        "nothing in the file was executed",
        hint="a checkpoint should hold only tensors and plain data; if you trust its "
             "source, load it in Python and " + _SAVE_STATE_DICT)


def _unreadable(path: Path, reason: str) -> BadCheckpointError:
    return BadCheckpointError(
        f"{path} cannot be read safely ({reason})",
        hint=f"the file may be damaged, or written with pickle_protocol > 2; {_SAVE_STATE_DICT}")


def _corrupt(path: Path, detail: str) -> BadCheckpointError:
    return BadCheckpointError(f"{path} is truncated or not a checkpoint ({detail})",
                              hint=_FETCH_AGAIN)


def _reason(error: BaseException) -> str:
    """The informative line of a torch error, without its boilerplate paragraphs."""
    paragraphs = [part.strip() for part in str(error).split("\n\n")
                  if part.strip() and not part.strip().startswith("Check the documentation")]
    if not paragraphs:
        return type(error).__name__
    return paragraphs[-1].splitlines()[-1].strip()


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(printable(name) for name in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _unwrap(loaded: Any, *, path: Path, ema: bool) -> tuple[StateDict, str | None, bool]:
    """Pick the plain (or EMA) state dict out of what torch.load returned."""
    candidates = dict(_candidates(loaded, trail=()))
    averaged = [trail for trail in candidates if set(trail) & set(_EMA_KEYS)]
    plain = [trail for trail in candidates if trail not in averaged]
    if not candidates:
        raise BadCheckpointError(
            f"{path} holds no state dict (top-level keys: {_top_level_keys(loaded)})",
            hint="expected a mapping of names to tensors, bare or under one of "
                 + ", ".join(_PLAIN_KEYS + _EMA_KEYS))
    if ema and not averaged:
        found = ("it is a bare state dict" if plain == [()]
                 else f"its top-level keys are {_top_level_keys(loaded)}")
        raise UsageError(f"{path} has no EMA weights",
                         hint=f"{found}; drop --ema to use the plain weights")
    # A file holding only an EMA copy has no other weights to use; container_key says so.
    chosen = averaged[0] if ema else (plain or averaged)[0]
    return candidates[chosen], ".".join(chosen) or None, bool(plain and averaged)


def _candidates(node: Any, *, trail: tuple[str, ...]) -> list[tuple[tuple[str, ...], StateDict]]:
    """State dicts reachable through container keys, in order of preference."""
    import torch

    if not isinstance(node, Mapping):
        return []
    found = []
    if len(trail) < _MAX_DEPTH:
        for key in _PLAIN_KEYS + _EMA_KEYS:
            found += _candidates(node.get(key), trail=(*trail, key))
    # Once a container matched, a wrapper's own tensors (e.g. a `best_acc`) are not weights.
    tensors = {key: value for key, value in node.items()
               if isinstance(key, str) and isinstance(value, torch.Tensor)}
    return found if found or not tensors else [(trail, tensors)]


def _top_level_keys(loaded: Any) -> str:
    if isinstance(loaded, Mapping):
        return _listing([str(key) for key in loaded], limit=12) or "none"
    return f"none, it holds a {type(loaded).__name__}"


def _strip_prefixes(state: StateDict) -> tuple[StateDict, tuple[str, ...]]:
    """Remove wrapper prefixes (DDP, torch.compile, ...) while every key shares one."""
    stripped: list[str] = []
    while state:
        prefix = next((candidate for candidate in _WRAPPER_PREFIXES
                       if all(key.startswith(candidate) and len(key) > len(candidate)
                              for key in state)), None)
        if prefix is None:
            break
        state = {key[len(prefix):]: value for key, value in state.items()}
        stripped.append(prefix)
    return state, tuple(stripped)


# -- archive limits ---------------------------------------------------------------------------
# A torch zip declares each record's uncompressed size in its central directory, and torch's
# reader allocates that much before inflating. So every size is checked before anything is
# inflated: the pickle against a fixed bound (a MobileOne S4 training checkpoint with optimizer
# state pickles to under 100 KB), each tensor record against the bytes the pickle's storages
# need, every other record against a small bound, and the tensors' total against a ceiling.
PICKLE_CEILING = 64 << 20
"""Largest data.pkl read: 64 MiB, about 600x the pickle of an S4 training checkpoint."""
RECORD_CEILING = 1 << 20
"""Largest record that is neither the pickle nor a tensor storage (version, byteorder...)."""
TENSOR_CEILING = 8 << 30
"""Largest total of tensor bytes: 8 GiB, 30x an S4 training checkpoint with Adam state."""
# Bytes per element of each storage class torch.save names (UntypedStorage counts bytes).
_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
    "UntypedStorage": 1, "QInt8Storage": 1, "QUInt8Storage": 1, "QInt32Storage": 4,
    "Float8_e4m3fnStorage": 1, "Float8_e5m2Storage": 1, "Float8_e4m3fnuzStorage": 1,
    "Float8_e5m2fnuzStorage": 1,
}


@dataclass(frozen=True)
class ArchiveScan:
    """What the records of a torch zip declare, checked before anything is inflated."""

    storage_bytes: dict[str, int | None]
    """Bytes each storage key needs, from the pickle's persistent ids (None: unknown type)."""
    tensor_bytes: int
    """Total bytes of the tensor records."""


def check_archive(path: Path, *, tensor_ceiling: int | None = None) -> ArchiveScan:
    """Refuse a torch zip whose declared sizes exceed what its tensors need, or whose CRCs fail.

    Order: central directory sizes (nothing inflated), then the pickle (bounded, CRC-checked)
    and its storage sizes, then each tensor record's declared size against them, then a
    streamed CRC-32 check of every record in 1 MiB chunks (torch checks none of a stored
    record's CRC). Memory stays at the pickle's size plus one chunk.
    """
    ceiling = TENSOR_CEILING if tensor_ceiling is None else tensor_ceiling
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            pickles = [info for info in records if info.filename.endswith("/data.pkl")
                       or info.filename == "data.pkl"]
            for info in records:
                bound = PICKLE_CEILING if info in pickles else None
                if bound is not None and info.file_size > bound:
                    raise _corrupt(path, f"record {printable(info.filename)} declares "
                                         f"{info.file_size:,} bytes, over the {bound:,}-byte "
                                         "bound of a checkpoint's pickle")
            if not pickles:  # not written by torch.save: torch's own reader names the problem
                return ArchiveScan(storage_bytes={}, tensor_bytes=0)
            pickle_record = pickles[0]
            prefix = pickle_record.filename[: -len("data.pkl")]
            storages = storage_sizes(archive.read(pickle_record))
            total = _check_record_sizes(path, records, prefix=prefix, storages=storages,
                                        pickle_record=pickle_record)
            if total > ceiling:
                raise _corrupt(path, f"its tensors declare {total:,} bytes, over the "
                                     f"{ceiling:,}-byte ceiling of a MobileOne checkpoint")
            for info in records:
                _check_crc(archive, info)
    except zipfile.BadZipFile as error:
        raise _corrupt(path, _zip_reason(error)) from None
    except (zlib.error, EOFError, NotImplementedError, ValueError) as error:
        raise _corrupt(path, f"unreadable zip: {error}") from None
    return ArchiveScan(storage_bytes=storages, tensor_bytes=total)


def _check_record_sizes(path: Path, records: list[zipfile.ZipInfo], *, prefix: str,
                        storages: dict[str, int | None], pickle_record: zipfile.ZipInfo) -> int:
    """Each record's declared size against what it may hold; returns the tensor bytes."""
    total = 0
    for info in records:
        if info is pickle_record:
            continue
        key = info.filename[len(prefix) + len("data/"):] \
            if info.filename.startswith(f"{prefix}data/") else None
        referenced = key is not None and key in storages
        needed = storages.get(key) if key is not None else None
        bound = needed if needed is not None else TENSOR_CEILING if referenced else RECORD_CEILING
        if info.file_size > bound:
            what = (f"its tensors need {needed:,}" if needed is not None
                    else f"the bound of a record no tensor refers to is {RECORD_CEILING:,}")
            raise _corrupt(path, f"record {printable(info.filename)} declares "
                                 f"{info.file_size:,} bytes, {what}")
        if referenced:
            total += info.file_size
    return total


def _check_crc(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Read a record in chunks; zipfile raises BadZipFile when its CRC-32 does not match."""
    with archive.open(info) as stream:
        while stream.read(CHUNK):
            pass


def _zip_reason(error: zipfile.BadZipFile) -> str:
    text = str(error)
    match = re.match(r"Bad CRC-32 for file '(.*)'", text)
    if match:
        return f"record {printable(match.group(1))} fails its CRC-32 check: its bytes changed"
    if text == "File is not a zip file":  # it starts like one (checked): its end is missing
        return "zip archive is incomplete"
    return f"unreadable zip: {printable(text)}"


class _Marker:
    """The pickle machine's MARK on the evaluation stack."""


class _Unknown:
    """A stack value the scan does not model (a built object)."""


_MARK = _Marker()
_UNKNOWN = _Unknown()
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_VALUE_OPS = frozenset({"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                        "BINSTRING", "SHORT_BINSTRING", "INT", "BININT", "BININT1", "BININT2",
                        "LONG", "LONG1", "LONG4"})


def storage_sizes(data: bytes) -> dict[str, int | None]:
    """Bytes needed by each storage a torch pickle names, found without unpickling.

    torch.save writes a storage as the persistent id `('storage', torch.<Type>Storage, key,
    location, numel)`. The opcodes are run on a symbolic stack (each opcode's stack effect is
    the one pickletools documents), keeping strings, ints, globals and tuples and nothing else,
    so nothing is constructed and nothing runs.
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    found: dict[str, int | None] = {}
    try:
        for opcode, argument, _ in pickletools.genops(io.BytesIO(data)):
            name = opcode.name
            if name in _VALUE_OPS:
                stack.append(argument)
            elif name == "GLOBAL":
                stack.append(("global", str(argument).replace(" ", ".")))
            elif name == "STACK_GLOBAL":
                attribute, module = stack.pop(), stack.pop()
                stack.append(("global", f"{module}.{attribute}"))
            elif name in _MEMO_PUT:
                memo[int(str(argument))] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in _MEMO_GET:
                stack.append(memo.get(int(str(argument)), _UNKNOWN))
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "TUPLE":
                stack.append(tuple(_pop_to_mark(stack)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
            elif name == "BINPERSID":
                _record_storage(stack.pop(), found)
                stack.append(_UNKNOWN)
            else:
                _generic_effect(opcode, stack)
    except (ValueError, IndexError, KeyError, TypeError) as error:
        raise ValueError(f"damaged pickle ({error})") from None
    return found


def _pop_to_mark(stack: list[Any]) -> list[Any]:
    items: list[Any] = []
    while (item := stack.pop()) is not _MARK:
        items.append(item)
    items.reverse()
    return items


def _generic_effect(opcode: pickletools.OpcodeInfo, stack: list[Any]) -> None:
    """Pop and push as many values as `opcode` does, as pickletools documents it."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        _pop_to_mark(stack)
        before = before[: before.index(pickletools.markobject)]
    for _ in before:
        stack.pop()
    stack.extend(_MARK if item is pickletools.markobject else _UNKNOWN
                 for item in opcode.stack_after)


def _record_storage(persistent_id: Any, found: dict[str, int | None]) -> None:
    if not (isinstance(persistent_id, tuple) and len(persistent_id) == 5
            and persistent_id[0] == "storage"):
        return
    _, storage_type, key, _, numel = persistent_id
    kind = storage_type[1].rsplit(".", 1)[-1] if isinstance(storage_type, tuple) else ""
    itemsize = _STORAGE_ITEMSIZE.get(kind)
    if not isinstance(key, str):
        return
    if itemsize is None or not isinstance(numel, int) or numel < 0:
        found[key] = None  # a storage type this scan does not know: bounded by the ceiling
    elif found.get(key, 0) is not None:
        found[key] = max(found.get(key) or 0, numel * itemsize)

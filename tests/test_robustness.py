"""Property: a mutated checkpoint either folds and verifies, or is refused in one clean line.

Valid checkpoints of a tiny custom MobileOne (three layouts, with and without a classifier)
are mutated by hypothesis: keys dropped, renamed or added, shapes and dtypes changed, values
made NaN or Inf, the state dict wrapped, prefixed and saved in each file format. Each case
goes through the real CLI (`fold --json`). Every mutation also says what the outcome must
be, so an accepted-but-broken file or a refused-but-valid one fails the test too.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fixtures.generate import state_in_layout
from mobileone_cli.cli import main
from mobileone_cli.layouts import convert_key
from mobileone_cli.synthetic import make_train_state
from mobileone_cli.variants import ArchitectureSpec, VariantConfig, build_spec

LAYOUTS = ("apple", "timm", "mmpretrain")
# 64 px: the smallest size whose non-square verification input (size - 32 rows) is not empty.
INPUT_SIZE = "64"
FOLD = "fold"  # the mutated file must fold and verify (exit 0)
REFUSE = "refuse"  # it must be refused with a one-line error (exit 1)
EITHER = "either"  # a design choice either way (e.g. a non-tensor value is skipped)
# No shrinking: one example takes up to a second, shrinking one took over five minutes, and
# each failure already says in words which mutations made it.
SETTINGS = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

State = dict[Any, Any]


def tiny_spec(*, num_classes: int | None) -> ArchitectureSpec:
    """A quarter-width MobileOne with two conv branches, SE in stages 3-4, and short stages.

    Keeping the first and last (depthwise, pointwise) pair of each long stage keeps every
    kind of block (stride 2, identity branch, squeeze-excite) while folding in a fraction
    of a second.
    """
    config = VariantConfig("tiny", (0.25, 0.25, 0.25, 0.25), conv_branches=2,
                           se_blocks=(0, 0, 1, 1))
    spec = build_spec(config, num_classes=num_classes)
    stages = tuple(stage if len(stage) <= 4 else stage[:2] + stage[-2:] for stage in spec.stages)
    return ArchitectureSpec(stem=spec.stem, stages=stages, num_classes=num_classes)


Bases = dict[tuple[str, bool], dict[str, torch.Tensor]]
BASES = [(layout, headless) for layout in LAYOUTS for headless in (False, True)]


@pytest.fixture(scope="module")
def bases() -> Bases:
    """Valid train-time states by (layout, headless), generated once."""
    canonical = make_train_state(tiny_spec(num_classes=5), seed=0)
    headless = {key: value for key, value in canonical.items() if not key.startswith("linear.")}
    return {(layout, without_head): state_in_layout(headless if without_head else canonical, layout)
            for layout, without_head in BASES}


# -- mutations ------------------------------------------------------------------------------
@dataclass
class Mutated:
    """A state dict being mutated, the keys already touched, and the verdicts so far."""

    layout: str
    state: State
    touched: set[Any] = field(default_factory=set)
    verdicts: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)

    def untouched(self, accept: Callable[[str, Any], bool] = lambda key, value: True) -> list[str]:
        """Keys no earlier mutation changed, so no two mutations can undo each other."""
        return sorted(key for key, value in self.state.items()
                      if isinstance(key, str) and key not in self.touched and accept(key, value))

    def touch(self, key: Any) -> None:
        self.touched.add(key)
        if is_head(key):  # dropping both head keys makes a headless model, which is valid
            self.touched.update(k for k in self.state if is_head(k))

    def record(self, description: str, verdict: str) -> None:
        self.applied.append(description)
        self.verdicts.append(verdict)


Draw = Callable[..., Any]
Mutation = Callable[[Mutated, Draw], None]


def is_head(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(("linear.", "head.fc."))


def is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def is_weight(key: str, value: Any) -> bool:
    """A floating-point tensor the fold reads (not BatchNorm's integer counter)."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not is_counter(key)


def is_kernel(key: str) -> bool:
    return key.endswith(("conv.weight", "reparam.weight"))


def pick(case: Mutated, draw: Draw, accept: Callable[[str, Any], bool] = lambda k, v: True
         ) -> str | None:
    """An untouched key; a quarter of the time one that shapes the inferred architecture."""
    keys = case.untouched(accept)
    shaping = [key for key in keys if is_head(key) or is_kernel(key)]
    if not keys:
        return None
    return draw(st.sampled_from(shaping) if shaping and draw(st.integers(0, 3)) == 0
                else st.sampled_from(keys))


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float64)
NON_FLOAT_DTYPES = (torch.int8, torch.uint8, torch.int64, torch.bool, torch.float8_e4m3fn,
                    torch.float8_e5m2)
# Any text, and a few that once could break a message: rich markup, a line break, format codes.
GARBAGE = (st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
           | st.sampled_from(["", "[bold]x[/]", "a\nb", "weight", "%s{}"]))


# Benign: applied first, to the whole state dict; the file must still fold.
def all_to_float_dtype(case: Mutated, draw: Draw) -> None:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    case.state = {key: value.to(dtype) if is_weight(key, value) else value
                  for key, value in case.state.items()}
    case.record(f"every weight to {dtype}", FOLD)


def drop_head(case: Mutated, draw: Draw) -> None:
    case.state = {key: value for key, value in case.state.items() if not is_head(key)}
    case.record("classifier dropped (a headless backbone)", FOLD)


def drop_batch_counters(case: Mutated, draw: Draw) -> None:
    case.state = {key: value for key, value in case.state.items() if not is_counter(key)}
    case.record("every num_batches_tracked dropped", FOLD)


def one_weight_to_float_dtype(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw, is_weight)
    if key is not None:
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        case.state[key] = case.state[key].to(dtype)
        case.touch(key)
        case.record(f"{key!r} to {dtype} (mixed dtypes)", FOLD)


BENIGN_STATE: tuple[Mutation, ...] = (all_to_float_dtype, drop_head, drop_batch_counters,
                                      one_weight_to_float_dtype)


# Per key: each acts on a key no earlier mutation touched.
def drop_key(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw)
    if key is not None:
        del case.state[key]
        case.touch(key)
        case.record(f"dropped {key!r}", REFUSE)


def _rename(case: Mutated, key: str, new: Any, description: str) -> None:
    case.state[new] = case.state.pop(key)
    case.touch(key)
    case.touch(new)
    case.record(f"{description}: {key!r} -> {new!r}", REFUSE)


NEAR_MISSES: dict[str, Callable[[str], str]] = {
    "trailing underscore": lambda key: key + "_",
    "plural leaf": lambda key: key + "s",
    "capitalised": lambda key: key[:1].upper() + key[1:],
    "lone wrapper prefix": lambda key: "model." + key,
    "double dot": lambda key: key.replace(".", "..", 1),
}


def rename_near_miss(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw)
    if key is not None:
        how = draw(st.sampled_from(sorted(NEAR_MISSES)))
        _rename(case, key, NEAR_MISSES[how](key), f"renamed ({how})")


def rename_to_other_layout(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw)
    if key is None:
        return
    other = draw(st.sampled_from([layout for layout in LAYOUTS if layout != case.layout]))
    new = convert_key(key, source=case.layout, target=other)
    if new == key:  # timm and mmpretrain name their classifier alike
        case.record(f"{key!r} is the same in {other}", FOLD)
        return
    _rename(case, key, new, f"renamed to {other}")


def rename_to_garbage(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw)
    new = draw(GARBAGE)
    if key is not None and new not in case.state:
        _rename(case, key, new, "renamed to garbage")


def junk_tensor(draw: Draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), max_size=5))
    dtype = draw(st.sampled_from((torch.float32, *FLOAT_DTYPES, *NON_FLOAT_DTYPES)))
    return torch.ones(shape).to(dtype)


def add_junk_tensor(case: Mutated, draw: Draw) -> None:
    similar = {"apple": "stage1.0.rbr_conv.7.conv.weight", "timm": "stages.3.9.identity.weight",
               "mmpretrain": "backbone.stage4.0.se.conv3.conv.weight"}[case.layout]
    key = draw(GARBAGE | st.just(similar) | st.just("stage0.rbr_conv.0.bn.bias_extra"))
    if key not in case.state:
        case.state[key] = junk_tensor(draw)
        case.touch(key)
        case.record(f"added tensor {key!r}", REFUSE)


def add_non_tensor(case: Mutated, draw: Draw) -> None:
    """Non-tensor values (and non-string keys) are not weights; skipping them is allowed."""
    key = draw(GARBAGE | st.integers(-3, 3))
    value = draw(st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(),
                                                                            max_size=3))
    if key not in case.state:
        case.state[key] = value
        case.touch(key)
        case.record(f"added non-tensor {key!r}: {value!r}", EITHER)


def change_shape(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw)
    if key is None:
        return
    old = case.state[key]
    shape = list(old.shape)
    how = draw(st.sampled_from(["dim +1", "dim -1", "extra dim", "scalar", "one dim fewer"]))
    if how.startswith("dim") and shape:
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = max(shape[axis] + (1 if how == "dim +1" else -1), 0)
    elif how == "scalar":
        shape = []
    elif how == "one dim fewer" and shape:
        shape = shape[:-1]
    if how == "extra dim" or shape == list(old.shape):
        shape = [*old.shape, 1]
    case.state[key] = torch.randn(shape).to(old.dtype) if old.is_floating_point() \
        else torch.zeros(shape, dtype=old.dtype)
    case.touch(key)
    case.record(f"{key!r} reshaped {tuple(old.shape)} -> {tuple(shape)} ({how})", REFUSE)


def change_dtype(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw, is_weight)
    if key is None:
        return
    dtype = draw(st.sampled_from(FLOAT_DTYPES + NON_FLOAT_DTYPES))
    case.state[key] = case.state[key].to(dtype)
    case.touch(key)
    case.record(f"{key!r} to {dtype}", FOLD if dtype in FLOAT_DTYPES else REFUSE)


def change_counter_dtype(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw, lambda key, value: is_counter(key))
    if key is not None:
        dtype = draw(st.sampled_from((torch.int32, torch.int8, torch.float32, torch.bool)))
        case.state[key] = case.state[key].to(dtype)
        case.touch(key)
        case.record(f"{key!r} to {dtype}", EITHER)


def all_to_non_float(case: Mutated, draw: Draw) -> None:
    dtype = draw(st.sampled_from(NON_FLOAT_DTYPES))
    case.state = {key: value.to(dtype) if isinstance(value, torch.Tensor) else value
                  for key, value in case.state.items()}
    case.touched.update(case.state)
    case.record(f"every tensor to {dtype}", REFUSE)


def non_finite(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw, is_weight)
    if key is None:
        return
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    tensor = case.state[key].clone()
    everywhere = draw(st.booleans())
    if everywhere:
        tensor.fill_(value)
    else:
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = value
    case.state[key] = tensor
    case.touch(key)
    case.record(f"{key!r} {'all' if everywhere else 'one'} {value}", REFUSE)


def negative_variance(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw, lambda key, value: key.endswith("running_var"))
    if key is not None:
        tensor = case.state[key].clone()
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = -draw(
            st.floats(1e-3, 1e3))
        case.state[key] = tensor
        case.touch(key)
        case.record(f"{key!r} negative", REFUSE)


def not_dense(case: Mutated, draw: Draw) -> None:
    key = pick(case, draw, is_weight)
    if key is not None:
        kind = draw(st.sampled_from(["meta", "sparse"]))
        value = case.state[key]
        case.state[key] = value.to("meta") if kind == "meta" else value.to_sparse()
        case.touch(key)
        case.record(f"{key!r} made {kind}", REFUSE)


def block_kernel_size(case: Mutated, draw: Draw) -> None:
    """Every conv kernel of one block resized alike: a consistent block, foldable if k is odd."""
    def branch_kernel(key: str, value: Any = None) -> bool:
        return is_kernel(key) and not any(part in key for part in ("scale", "se.", "reparam"))

    key = pick(case, draw, branch_kernel)
    if key is None:
        return
    prefix = key[:key.index("conv")]  # the block: `stage1.0.rbr_`, `stages.0.0.`, ...
    kernels = case.untouched(lambda other, value: other.startswith(prefix) and branch_kernel(other))
    size = draw(st.sampled_from([0, 1, 2, 4, 5]))
    for name in kernels:
        out_channels, per_group = case.state[name].shape[:2]
        case.state[name] = 0.1 * torch.randn(out_channels, per_group, size, size)
        case.touch(name)
    case.record(f"{kernels} to {size}x{size}", FOLD if size % 2 else REFUSE)


def classifier_width(case: Mutated, draw: Draw) -> None:
    keys = case.untouched(lambda key, value: is_head(key))
    if len(keys) == 2:
        bias, weight = sorted(keys)
        classes = draw(st.sampled_from([0, 1, 7]))
        case.state[weight] = 0.02 * torch.randn(classes, case.state[weight].shape[1])
        case.state[bias] = torch.zeros(classes)
        case.touch(weight)
        case.record(f"{classes} classes", FOLD if classes else REFUSE)


ALIASES = {  # another spelling the reader also understands, per layout
    "apple": lambda key: re.sub(r"^stage(\d)\.(\d+)\.", r"stage\1.0\2.", key),
    "timm": lambda key: re.sub(r"^stages\.(\d)\.", r"stages_\1.", key),
    "mmpretrain": lambda key: key.removeprefix("backbone."),
}


def alias(case: Mutated, draw: Draw) -> None:
    """The same tensor named twice must be refused; named once, oddly, is a choice."""
    key = pick(case, draw, lambda key, value: ALIASES[case.layout](key) != key)
    if key is None:
        return
    new = ALIASES[case.layout](key)
    if draw(st.booleans()):
        case.state[new] = torch.randn_like(case.state[key].float()).to(case.state[key].dtype)
        case.touch(key)
        case.touch(new)
        case.record(f"{key!r} also as {new!r}", REFUSE)
    else:
        case.state[new] = case.state.pop(key)
        case.touch(new)
        case.touch(key)
        case.record(f"{key!r} renamed {new!r}", EITHER)


PER_KEY: tuple[Mutation, ...] = (
    drop_key, rename_near_miss, rename_to_other_layout, rename_to_garbage, add_junk_tensor,
    add_non_tensor, change_shape, change_dtype, change_counter_dtype, all_to_non_float,
    non_finite, negative_variance, not_dense, block_kernel_size, classifier_width, alias,
)


# -- containers and files -------------------------------------------------------------------
PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.")


def optimizer_state() -> dict[str, Any]:
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 0.1, "params": [0]}]}


WRAPPERS: dict[str, Callable[[State], Any]] = {
    "bare": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 7},
    "model.state_dict": lambda s: {"model": {"state_dict": s}, "optimizer": optimizer_state()},
    "module": lambda s: {"module": s},
    "with EMA copy": lambda s: {"state_dict": s, "state_dict_ema": dict(s), "epoch": 1},
    "EMA only": lambda s: {"model_ema": s},
    "training extras": lambda s: {
        "state_dict": s, "epoch": 90, "arch": "mobileone", "best_acc1": torch.tensor(71.3),
        "optimizer": optimizer_state(), "args": argparse.Namespace(lr=0.1, epochs=300),
        "np_best": np.float64(0.7), "meta": {"env": "x", "seed": 0}},
}
BAD_WRAPPERS: dict[str, Callable[[State], Any]] = {
    "unknown container key": lambda s: {"weights": s},
    "nested too deep": lambda s: {"model": {"model": {"model": {"state_dict": s}}}},
    "a list": lambda s: [s],
}


@dataclass(frozen=True)
class Packing:
    prefixes: tuple[str, ...]
    wrapper: str
    file_format: str
    metadata_size: int = 0
    """safetensors: its header length moves with the metadata (one in 256 starts with 0x80)."""

    def pack(self, state: State) -> Any:
        for prefix in reversed(self.prefixes):
            state = {f"{prefix}{key}" if isinstance(key, str) else key: value
                     for key, value in state.items()}
        return {**WRAPPERS, **BAD_WRAPPERS}[self.wrapper](state)

    @property
    def verdict(self) -> str:
        return REFUSE if self.wrapper in BAD_WRAPPERS else FOLD


@st.composite
def packings(draw: Draw, state: State, *, benign: bool) -> Packing:
    prefixes = tuple(draw(st.lists(st.sampled_from(PREFIXES), max_size=2, unique=True)))
    wrappers = sorted(WRAPPERS) + ([] if benign else sorted(BAD_WRAPPERS))
    flat = all(isinstance(key, str) and isinstance(value, torch.Tensor) and not value.is_meta
               and value.layout == torch.strided for key, value in state.items())
    wrapper = draw(st.sampled_from(wrappers))
    formats = ["torch-zip", "torch-legacy"] + (["safetensors"] if flat and wrapper == "bare"
                                               else [])
    return Packing(prefixes, wrapper, draw(st.sampled_from(formats)), draw(st.integers(0, 255)))


def save(obj: Any, packing: Packing, folder: Path) -> Path:
    if packing.file_format == "safetensors":
        path = folder / "ckpt.safetensors"
        # safetensors refuses shared storage: every tensor gets its own.
        save_file({key: value.clone().contiguous() for key, value in obj.items()}, str(path),
                  metadata={"format": "pt", "note": "x" * packing.metadata_size})
    else:
        path = folder / "ckpt.pth"
        torch.save(obj, path, _use_new_zipfile_serialization=packing.file_format == "torch-zip")
    return path


# -- the property ---------------------------------------------------------------------------
def fold_through_cli(state: State, packing: Packing) -> tuple[int, str, str, list[str]]:
    """Run `mobileone fold --json`; returns exit code, stdout, stderr and the output folder."""
    with tempfile.TemporaryDirectory() as source, tempfile.TemporaryDirectory() as target:
        checkpoint = save(packing.pack(state), packing, Path(source))
        output = Path(target) / "folded.safetensors"
        result = CliRunner().invoke(main, ["fold", str(checkpoint), "-o", str(output),
                                           "--input-size", INPUT_SIZE, "--json"])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"a traceback, not a clean error: {result.exception!r}"
                                 ) from result.exception
        left = sorted(path.name for path in Path(target).iterdir())
    return result.exit_code, result.stdout, result.stderr, left


def check_outcome(code: int, stdout: str, stderr: str, left: list[str], verdict: str) -> None:
    assert code in (0, 1, 3), (code, stderr)
    assert "Traceback" not in stderr, stderr
    if code == 0:
        report = json.loads(stdout)
        assert report["fold_verification"]["passed"] is True
        assert left == ["folded.safetensors"], left
    else:
        assert left == [], f"exit {code} left files behind: {left}"
    if code == 1:  # --json: the error object, and nothing else, on stdout
        assert json.loads(stdout)["error"]["code"] == 1, stdout
        lines = stderr.splitlines()
        assert lines and lines[0].startswith("error: "), stderr
        assert all(line.startswith(("error: ", "hint: ")) for line in lines), stderr
    if code == 3:
        assert json.loads(stdout)["fold_verification"]["passed"] is False
    if verdict == FOLD:
        assert code == 0, f"a valid checkpoint was not folded (exit {code}): {stderr}"
    if verdict == REFUSE:
        assert code == 1, f"a broken checkpoint was not refused (exit {code}): {stderr}"


def combined(verdicts: list[str]) -> str:
    if REFUSE in verdicts:
        return REFUSE
    return EITHER if EITHER in verdicts else FOLD


def mutate(bases: Bases, draw: Draw, *, benign_only: bool) -> tuple[Mutated, Packing]:
    layout, headless = draw(st.sampled_from(BASES), label="layout, headless")
    case = Mutated(layout=layout, state=dict(bases[(layout, headless)]))
    chosen = draw(st.lists(st.sampled_from(BENIGN_STATE), max_size=3, unique=True))
    for mutation in chosen:  # benign whole-state changes first, so none undoes a later one
        mutation(case, draw)
    if not benign_only:
        for mutation in draw(st.lists(st.sampled_from(PER_KEY), min_size=1, max_size=3)):
            mutation(case, draw)
    packing = draw(packings(case.state, benign=benign_only))
    case.record(f"packed {packing}", packing.verdict)
    return case, packing


@settings(SETTINGS, max_examples=80)
@given(data=st.data())
def test_a_mutated_checkpoint_folds_or_is_refused_in_one_line(bases: Bases,
                                                              data: st.DataObject) -> None:
    case, packing = mutate(bases, data.draw, benign_only=False)
    try:
        code, stdout, stderr, left = fold_through_cli(case.state, packing)
        check_outcome(code, stdout, stderr, left, combined(case.verdicts))
    except AssertionError as error:  # say in words which mutations broke it
        raise AssertionError(f"{case.layout}: {'; '.join(case.applied)}\n{error}") from error


@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_benign_changes_keep_a_checkpoint_foldable(bases: Bases, data: st.DataObject) -> None:
    case, packing = mutate(bases, data.draw, benign_only=True)
    assert combined(case.verdicts) == FOLD
    try:
        code, stdout, stderr, left = fold_through_cli(case.state, packing)
        check_outcome(code, stdout, stderr, left, FOLD)
    except AssertionError as error:
        raise AssertionError(f"{case.layout}: {'; '.join(case.applied)}\n{error}") from error

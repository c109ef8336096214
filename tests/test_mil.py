"""mobileone_cli.mil: saved Core ML programs, evaluated with numpy, against torch.

Each test model is traced, converted by coremltools to an ML Program for iOS 16
and saved as an `.mlpackage`; `run_program` must then compute what torch does.
Conversions are cached per module (about half a second each).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mobileone_cli.errors import BadArtifactError, UnsupportedOpError, UsageError
from mobileone_cli.mil import ProgramSummary, run_program, summarize_program

SHAPE = (1, 3, 32, 32)
FP32_RTOL = 1e-4
# fp16 unit roundoff: one rounding to fp16 moves a value by at most 2^-11 of its size.
FP16_UNIT_ROUNDOFF = 2.0**-11
# Ops that never round (relu, moving data) and casts (the input's rounding is counted once).
EXACT_OPS = {"relu", "reshape", "squeeze", "expand_dims", "transpose", "concat", "cast"}
# Ops that round twice: their fp16 weights were rounded once when stored, the result once.
WEIGHTED_OPS = {"conv", "linear", "matmul"}


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """Silence coremltools' chatter while it imports and converts.

    It logs through the `coremltools` logger (untested torch version, no Core ML
    runtime off a Mac): warnings.filterwarnings does not reach those, a logger
    level does. It warns through `warnings` about renamed outputs. Its tqdm
    progress bars obey TQDM_DISABLE=1 only if that is set before tqdm's first
    import, which `import torch` (torch.hub) has already done here, so stderr,
    where the bars are drawn, is redirected instead.
    """
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.filterwarnings("ignore", message=".*has been renamed.*")
            yield
    finally:
        logger.setLevel(level)


# --- Test models ------------------------------------------------------------------------


class ConvRelu(nn.Module):
    """(a) conv3x3 stride 2 + relu."""

    def __init__(self, channels_in: int = 3, channels_out: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class DepthwisePointwise(nn.Module):
    """(b) depthwise conv (groups = channels) + relu + pointwise conv."""

    def __init__(self, channels: int = 3, channels_out: int = 8) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(torch.relu(self.depthwise(x)))


class SqueezeExcite(nn.Module):
    """(c) x * sigmoid(conv2(relu(conv1(mean over space))))."""

    def __init__(self, channels: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(squeezed))))


class MeanLinear(nn.Module):
    """(d) global mean + linear classifier head (mean, never view(N, -1))."""

    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean((2, 3)))


class SmallNet(nn.Module):
    """(e) the blocks above in one classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvRelu(3, 16)
        self.separable = DepthwisePointwise(16, 32)
        self.squeeze_excite = SqueezeExcite(32, 8)
        self.down = ConvRelu(32, 32)
        self.head = MeanLinear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.separable(self.stem(x)))
        return self.head(self.down(self.squeeze_excite(x)))


class SoftmaxClassifier(nn.Module):
    """A classifier ending in softmax, for ClassifierConfig."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = ConvRelu(3, 8)
        self.head = MeanLinear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.features(x)), dim=1)


class OtherOps(nn.Module):
    """Ops beyond the classifier blocks: same padding, dilation, unfolded BN, pools, matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding="same", dilation=2)
        self.norm = nn.BatchNorm2d(8)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.norm.running_mean = torch.empty(8).uniform_(-1, 1, generator=generator)
            self.norm.running_var = torch.empty(8).uniform_(0.5, 2, generator=generator)
            self.norm.weight.uniform_(0.5, 1.5, generator=generator)
            self.norm.bias.uniform_(-1, 1, generator=generator)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        y = y + self.norm(y)  # a BN-only branch, as in an unfolded MobileOne block
        padded = nn.functional.avg_pool2d(y, 3, stride=2, padding=1, count_include_pad=False)
        plain = nn.functional.avg_pool2d(y, 2, stride=2)
        both = torch.cat([padded, plain], dim=1)
        weights = both.mean((2, 3)).unsqueeze(1)
        mixed = torch.matmul(weights, both.flatten(2)).squeeze(1)
        ratio = mixed / (torch.sigmoid(mixed) + 1.0) - 0.5
        return ratio, both.permute(0, 2, 3, 1)


def build(model_class: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return model_class().eval()


def sample_input(seed: int = 0) -> np.ndarray:
    # Mean 1, so a global mean carries signal into the head instead of averaging to zero.
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=generator) + 1.0).numpy()


# --- Conversion -------------------------------------------------------------------------


def convert(
    model: nn.Module,
    path: Path,
    *,
    precision: str,
    outputs: int = 1,
    io_dtype: Any = None,
    image: dict[str, Any] | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Trace, convert to an iOS 16 ML Program and save; `io_dtype` pins input/output dtypes."""
    with quiet_coremltools():
        import coremltools as ct

        traced = torch.jit.trace(model, torch.from_numpy(sample_input()))
        dtype_option = {} if io_dtype is None else {"dtype": io_dtype}
        if image is not None:
            inputs = [ct.ImageType(name="image", shape=SHAPE, **image)]
        else:
            inputs = [ct.TensorType(name="image", shape=SHAPE, **dtype_option)]
        output_types = None
        if labels is None:
            names = ["logits"] if outputs == 1 else [f"output{i}" for i in range(outputs)]
            output_types = [ct.TensorType(name=name, **dtype_option) for name in names]
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=output_types,
            classifier_config=None if labels is None else ct.ClassifierConfig(labels),
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            compute_precision=getattr(ct.precision, precision),
        )
        mlmodel.save(str(path))
    return path


class Packages:
    """Converted packages, one per (model, precision), made on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cache: dict[tuple[str, str], Path] = {}

    def get(self, model_class: type[nn.Module], precision: str, **options: Any) -> Path:
        key = (model_class.__name__, precision + repr(sorted(options.items())))
        if key not in self.cache:
            path = self.folder / f"{model_class.__name__}-{precision}-{len(self.cache)}.mlpackage"
            self.cache[key] = convert(build(model_class), path, precision=precision, **options)
        return self.cache[key]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return Packages(tmp_path_factory.mktemp("mlpackages"))


# --- Comparisons ------------------------------------------------------------------------


def torch_outputs(model: nn.Module, x: np.ndarray, *, dtype: torch.dtype) -> list[np.ndarray]:
    model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        result = model(torch.from_numpy(x).to(dtype))
    results = result if isinstance(result, tuple) else (result,)
    return [tensor.double().numpy() for tensor in results]


def max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max())


def fp16_tolerance(summary: ProgramSummary, scale: float) -> float:
    """How far an fp16 program may drift from fp32 torch, in output units.

    Each rounding to fp16 moves a value by at most u = 2^-11 of its size. To
    first order the errors of successive roundings add, so after n roundings
    an output is off by at most n * u of the size of the values involved,
    which we take as the output scale: these layers (PyTorch's default init)
    shrink rather than amplify activations. n counts the input's rounding, one
    per rounding op, and two per conv/linear/matmul (weights, result), over all
    ops, not only the longest path, so it over-counts. Independent roundings
    usually partly cancel (sqrt(n) growth), so measured errors sit well below.
    """
    roundings = 1
    for op_type, count in summary.op_counts.items():
        if op_type in WEIGHTED_OPS:
            roundings += 2 * count
        elif op_type not in EXACT_OPS:
            roundings += count
    return roundings * FP16_UNIT_ROUNDOFF * scale


BLOCKS = [ConvRelu, DepthwisePointwise, SqueezeExcite, MeanLinear, SmallNet]
BLOCK_IDS = ["conv-stride2-relu", "depthwise-pointwise", "squeeze-excite", "mean-linear", "net"]


# --- Numerics against torch -------------------------------------------------------------


@pytest.mark.parametrize("model_class", BLOCKS, ids=BLOCK_IDS)
def test_fp32_program_matches_torch(packages: Packages, model_class: type[nn.Module]) -> None:
    package = packages.get(model_class, "FLOAT32")
    x = sample_input(seed=1)
    (expected,) = torch_outputs(build(model_class), x, dtype=torch.float64)
    actual = run_program(package, {"image": x})["logits"]
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert max_difference(actual, expected) <= FP32_RTOL * scale


@pytest.mark.parametrize("model_class", BLOCKS, ids=BLOCK_IDS)
def test_fp16_program_drifts_as_fp16_arithmetic_does(
    packages: Packages, model_class: type[nn.Module]
) -> None:
    # The whole net keeps fp32 I/O (cast ops inside), the blocks coremltools' default fp16 I/O.
    options = {"io_dtype": np.float32} if model_class is SmallNet else {}
    package = packages.get(model_class, "FLOAT16", **options)
    x = sample_input(seed=1)
    model = build(model_class)
    (exact,) = torch_outputs(model, x, dtype=torch.float64)
    (half,) = torch_outputs(model, x, dtype=torch.float16)
    actual = run_program(package, {"image": x})["logits"]
    assert actual.dtype == (np.float32 if options else np.float16)

    tolerance = fp16_tolerance(summarize_program(package), float(np.abs(exact).max()))
    off_exact = max_difference(actual, exact)
    off_half = max_difference(actual, half)
    assert off_exact <= tolerance
    # fp16 rounding really happened: the evaluation is torch's fp16 one (up to a few
    # roundings that fall differently), not the exact one; a silent fp32 evaluation
    # would sit near `exact` instead.
    assert off_half < off_exact
    assert off_half <= tolerance / 4


def test_other_ops_match_torch(packages: Packages) -> None:
    package = packages.get(OtherOps, "FLOAT32", outputs=2)
    ops = set(summarize_program(package).op_counts)
    # If coremltools ever stops emitting these for this model, the test no longer covers them.
    assert ops >= {"avg_pool", "batch_norm", "concat", "expand_dims", "matmul", "real_div"}
    assert ops >= {"reshape", "squeeze", "sub", "transpose"}
    x = sample_input(seed=1)
    expected = torch_outputs(build(OtherOps), x, dtype=torch.float64)
    actual = run_program(package, {"image": x})
    for name, reference in zip(["output0", "output1"], expected, strict=True):
        assert actual[name].shape == reference.shape
        scale = float(np.abs(reference).max())
        assert max_difference(actual[name], reference) <= FP32_RTOL * scale


# --- Image inputs and classifiers -------------------------------------------------------

IMAGE_SCALE = 1 / (0.226 * 255)
IMAGE_BIAS = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]
LABELS = ["cat", "dog", "fox", "owl"]


@pytest.mark.parametrize("precision", ["FLOAT32", "FLOAT16"])
def test_image_classifier_applies_preprocessing(packages: Packages, precision: str) -> None:
    image = {"scale": IMAGE_SCALE, "bias": IMAGE_BIAS, "color_layout": "RGB"}
    package = packages.get(SoftmaxClassifier, precision, image=image, labels=LABELS)
    summary = summarize_program(package)
    assert summary.inputs == (("image", "fp32", SHAPE),)
    assert summary.outputs == ("classLabel", "classLabel_probs")

    pixels = np.random.default_rng(2).integers(0, 256, SHAPE).astype(np.float32)
    bias = np.array(IMAGE_BIAS, dtype=np.float32).reshape(1, 3, 1, 1)
    model = build(SoftmaxClassifier)
    (expected,) = torch_outputs(model, pixels * np.float32(IMAGE_SCALE) + bias, dtype=torch.float64)
    outputs = run_program(package, {"image": pixels})

    probabilities = outputs["classLabel_probs"]
    assert probabilities.dtype == np.float32  # classify takes fp32 probabilities
    assert probabilities.shape == (1, len(LABELS))
    tolerance = FP32_RTOL if precision == "FLOAT32" else fp16_tolerance(summary, 1.0)
    assert max_difference(probabilities, expected) <= tolerance
    assert LABELS[int(outputs["classLabel"])] == LABELS[int(expected.argmax())]


# --- Summaries --------------------------------------------------------------------------


def test_summary_counts_the_ops_of_the_net(packages: Packages) -> None:
    summary = summarize_program(packages.get(SmallNet, "FLOAT32"))
    assert summary == ProgramSummary(
        function="main",
        inputs=(("image", "fp32", SHAPE),),
        outputs=("logits",),
        op_counts={
            "conv": 6,
            "linear": 1,
            "mul": 1,
            "reduce_mean": 2,
            "relu": 5,
            "sigmoid": 1,
        },
    )


def test_fp16_program_keeps_explicit_fp32_io(packages: Packages) -> None:
    summary = summarize_program(packages.get(SmallNet, "FLOAT16", io_dtype=np.float32))
    assert summary.inputs == (("image", "fp32", SHAPE),)
    assert summary.op_counts["cast"] == 2  # fp32 -> fp16 after the input, back before the output


def test_fp16_program_defaults_to_fp16_io_on_ios16(packages: Packages) -> None:
    package = packages.get(ConvRelu, "FLOAT16")
    summary = summarize_program(package)
    assert summary.inputs == (("image", "fp16", SHAPE),)
    assert "cast" not in summary.op_counts


# --- Errors -----------------------------------------------------------------------------


class Erf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


def test_unknown_op_is_an_error_naming_it(packages: Packages) -> None:
    package = packages.get(Erf, "FLOAT32")
    with pytest.raises(UnsupportedOpError, match=r"cannot evaluate op 'erf' \(output 'logits'\)"):
        run_program(package, {"image": sample_input()})


def test_wrong_input_name_is_a_usage_error(packages: Packages) -> None:
    package = packages.get(ConvRelu, "FLOAT32")
    with pytest.raises(UsageError, match=r"takes inputs \['image'\], got \['input'\]"):
        run_program(package, {"input": sample_input()})


def test_wrong_input_shape_is_a_usage_error(packages: Packages) -> None:
    package = packages.get(ConvRelu, "FLOAT32")
    with pytest.raises(UsageError, match=r"input 'image' has shape \(1, 3, 16, 16\)"):
        run_program(package, {"image": np.zeros((1, 3, 16, 16), dtype=np.float32)})


def test_folder_without_manifest_is_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(BadArtifactError, match=r"is not a readable \.mlpackage"):
        summarize_program(tmp_path)


def test_import_is_cheap() -> None:
    code = (
        "import sys, mobileone_cli.mil; "
        "heavy = {'numpy', 'coremltools', 'torch'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class ConvGelu(nn.Module):
    """conv3x3 + exact (erf) GELU, RepViT's activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaled up so the inputs of GELU span its curved part, where the forms differ.
        return self.act(3.0 * self.conv(x))


def test_exact_gelu_matches_torch(packages: Packages) -> None:
    package = packages.get(ConvGelu, "FLOAT32")
    assert summarize_program(package).op_counts.get("gelu") == 1
    x = sample_input(seed=1)
    (expected,) = torch_outputs(build(ConvGelu), x, dtype=torch.float64)
    actual = run_program(package, {"image": x})["logits"]
    # The tanh approximation is off by up to ~5e-4 of this scale: fp32 agreement proves erf.
    assert max_difference(actual, expected) <= 1e-6 * float(np.abs(expected).max())

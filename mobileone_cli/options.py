"""Every frozen options object of the core, with its defaults.

The CLI turns its flags into one of these and calls one function of `api`;
Python users build the same objects. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mobileone_cli.defaults import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_METHOD,
    DEFAULT_INPUT_SIZE,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_COSINE,
    QUANTIZE_MODES,
    QUANTIZED_MIN_AGREEMENT,
    QUANTIZED_MIN_COSINE,
)
from mobileone_cli.defaults import TARGETS as TARGETS

DEFAULT_REPORT_SIZE = (224, 224)
DEFAULT_REPORT_RUNS = 20
DEFAULT_REPORT_WARMUP = 5


@dataclass(frozen=True)
class SafetensorsOptions:
    """How to write the folded weights."""

    layout: str | None = None
    """Key naming of the file; the source's own layout when None."""
    dtype: str = "float32"
    """dtype of the written weights; the fold itself is always float64."""


@dataclass(frozen=True)
class OnnxOptions:
    """How to write the ONNX file; the defaults suit mobile runtimes."""

    opset: int = 17
    dynamic_batch: bool = False
    """Make the batch axis symbolic ("batch"); else it is fixed at 1."""
    dynamic_size: bool = False
    """Make height and width symbolic ("height", "width"); else both are the input size."""
    simplify: bool = True
    """Run onnxsim (constant folding, dead-node removal) before the checker."""


DEFAULT_COREML_TARGET = "iOS16"


@dataclass(frozen=True)
class CoreMLOptions:
    """How to convert and describe the package; the defaults suit an iPhone app."""

    target: str | None = None
    """Minimum deployment target, a `coremltools.target` name (iOS15+, macOS12+, ...); None:
    `DEFAULT_COREML_TARGET`, or the oldest that runs the `--quantize` mode's ops."""
    precision: str = "fp16"
    """Compute precision, "fp16" or "fp32"; inputs and outputs are fp32 either way."""
    image_input: bool = False
    """An RGB image input (0-255 pixels, as from the camera) instead of a normalised tensor."""
    description: str | None = None
    """Short description; default "MobileOne <variant> folded by mobileone <version>"."""
    version: str | None = None
    author: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class LiteRTOptions:
    """How to write the `.tflite` file."""

    channels_last: bool = False
    """Take a 1 x S x S x 3 (NHWC) input, as Android image pipelines give; else NCHW."""


@dataclass(frozen=True)
class Gates:
    """Release gates beyond numerical equivalence; None means no gate."""

    max_params: float | None = None
    max_macs: float | None = None
    max_size_mb: float | None = None
    """Per artifact, in MB of 10^6 bytes."""
    min_cosine: float | None = None
    """Mean per-sample cosine of a reduced-precision artifact against the fp32 model; None:
    `DEFAULT_MIN_COSINE` for fp16/bf16, `QUANTIZED_MIN_COSINE` for a `--quantize` mode."""
    min_agreement: float | None = None
    """Top-1 agreement of a reduced-precision classifier with the fp32 model; None: the
    default of the artifact's kind, as for `min_cosine`."""

    def cost_gates(self, *, quantized: bool) -> tuple[float, float]:
        """(min mean cosine, min top-1 agreement) for an artifact of this kind."""
        cosine = QUANTIZED_MIN_COSINE if quantized else DEFAULT_MIN_COSINE
        agreement = QUANTIZED_MIN_AGREEMENT if quantized else DEFAULT_MIN_AGREEMENT
        return (cosine if self.min_cosine is None else self.min_cosine,
                agreement if self.min_agreement is None else self.min_agreement)


__all__ = ["CALIBRATION_METHODS", "DEFAULT_CALIBRATION_METHOD", "QUANTIZE_MODES", "TARGETS"]
HELD_OUT_EVERY = 5
"""Without `--inputs`, every 5th calibration image (sorted) is held out to measure the cost."""


@dataclass(frozen=True)
class QuantizeOptions:
    """`export --quantize MODE`: how to compress, on which images, what to keep float."""

    mode: str | None = None
    """As `compress.TARGET_MODES` names it; None writes float artifacts."""
    calibration_dir: Path | None = None
    """A folder of images or an ImageFolder tree; required by modes that quantize activations."""
    calibration_count: int | None = None
    """Use this many calibration images, picked evenly; all when None."""
    calibration_method: str = DEFAULT_CALIBRATION_METHOD
    """ONNX w8a8: "minmax", "entropy" or "percentile"."""
    keep_float: tuple[str, ...] = ()
    """Folded layer names to keep float."""
    keep_float_count: int = 0
    """Also keep the N layers `report --sensitivity` ranks worst."""


@dataclass(frozen=True)
class ExportOptions:
    """One run of the export pipeline: a source, its targets and where they go."""

    source: Path
    targets: tuple[str, ...]
    """Backend names; more than one makes a bundle folder."""
    output: Path | None = None
    """A file (or .mlpackage) for one target, a folder (the bundle) for several."""
    force: bool = False
    rtol: float | None = None
    """None: the default rule, max(1e-4, 10x the fp32 noise floor)."""
    inputs_dir: Path | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    ema: bool = False
    labels_file: Path | None = None
    gates: Gates = field(default_factory=Gates)
    command: tuple[str, ...] = ()
    """The command line, recorded in a bundle's manifest."""
    required: tuple[str, ...] = ()
    """Targets of `--to all` whose missing packages are an error, not a skip."""
    keep_distillation_head: bool = False
    """RepViT: keep both classifiers (averaged at run time) instead of one averaged Linear."""
    safetensors: SafetensorsOptions = field(default_factory=SafetensorsOptions)
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    coreml: CoreMLOptions = field(default_factory=CoreMLOptions)
    tflite: LiteRTOptions = field(default_factory=LiteRTOptions)
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)

    @property
    def is_bundle(self) -> bool:
        """More than one target: the output is a bundle folder."""
        return len(self.targets) > 1


@dataclass(frozen=True)
class FoldOptions:
    """`fold`: the export pipeline with the one target safetensors, written to `output`."""

    checkpoint: Path
    output: Path
    rtol: float | None = None
    inputs_dir: Path | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    layout: str | None = None
    """Key naming of the output; the source's own layout when None."""
    ema: bool = False
    force: bool = False
    dtype: str = "float32"
    """dtype of the written weights; the fold itself is always float64."""
    gates: Gates = field(default_factory=Gates)
    """Only the cost gates apply: a float16/bfloat16 file is a reduced precision."""
    keep_distillation_head: bool = False
    """RepViT: keep both classifiers (averaged at run time) instead of one averaged Linear."""

    def as_export(self) -> ExportOptions:
        """The same job as the pipeline's options."""
        return ExportOptions(
            source=self.checkpoint, targets=("safetensors",), output=self.output,
            force=self.force, rtol=self.rtol, inputs_dir=self.inputs_dir,
            input_size=self.input_size, ema=self.ema, gates=self.gates,
            keep_distillation_head=self.keep_distillation_head,
            safetensors=SafetensorsOptions(layout=self.layout, dtype=self.dtype),
        )


@dataclass(frozen=True)
class VerifyOptions:
    """`verify ARTIFACT --against CHECKPOINT`."""

    artifact: Path
    against: Path
    """The train-time checkpoint the artifact must reproduce."""
    inputs_dir: Path | None = None
    input_size: int | None = None
    """Side of the verification inputs; default the artifact's static size, else 224."""
    rtol: float | None = None
    ema: bool = False
    gates: Gates = field(default_factory=Gates)


@dataclass(frozen=True)
class ReportOptions:
    """`report`: what to measure, at which size, how often."""

    sources: tuple[Path, ...]
    """Train-time checkpoints, folded safetensors files, or .onnx exports."""
    latency: bool = True
    batch: int = 1
    size: tuple[int, int] = DEFAULT_REPORT_SIZE
    """Input height and width, for MACs and latency."""
    threads: int | None = None
    """Intra-op threads for torch and onnxruntime; torch's current count when None."""
    runs: int = DEFAULT_REPORT_RUNS
    warmup: int = DEFAULT_REPORT_WARMUP
    per_stage: bool = False


@dataclass(frozen=True)
class SensitivityOptions:
    """`report --sensitivity`: rank a model's folded layers by what int8 weights cost each."""

    source: Path
    calibration_dir: Path
    calibration_count: int | None = None
    mode: str = "w8"
    """An int8-weight mode (w8, w8a8): each layer's weight is fake-quantized per channel."""
    input_size: int = DEFAULT_INPUT_SIZE
    ema: bool = False

"""The constants `mobileone --help` shows, in a module that imports nothing.

The CLI builds its options from these at start-up, so `--help` does not wait for the
modules that own the behaviour behind them (options and results are dozens of frozen
dataclasses, 15 ms to create). Those modules import the same names from here, so a
default is written once.
"""

TARGETS = ("safetensors", "onnx", "coreml", "executorch", "tflite", "ort")
"""Every export target by its `--to` name, in the order `--to all` writes them; the
registry `export.BACKENDS` holds one backend for each (tests/test_pipeline.py checks it)."""

DEFAULT_INPUT_SIZE = 224
"""Side of the square verification inputs (and of static exports)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""The files `--inputs` and `--calibration` folders are read for."""

# Measured at 160 px: a correct fold of the reference and synthetic checkpoints
# lands at 1.0-3.3e-5 (1.0-1.7x the fp32 noise floor); every injected fault in
# tests/faults.py at 2.9e-2 or more (over 1000x the floor). 1e-4 sits 3x above the
# one and 300x below the other. But the floor grows with depth and shrinks with
# input size (S4 at 32x96 px: 1.05e-4), so a fixed number cannot be right for
# every model: by default the tolerance is the larger of 1e-4 and 10x the floor.
DEFAULT_RTOL = 1e-4
FLOOR_FACTOR = 10.0
AUTO_TOLERANCE = f"max({DEFAULT_RTOL:g}, {FLOOR_FACTOR:g} x noise floor)"
# Gates on the cost of a reduced-precision artifact (mean per-sample cosine, top-1 agreement);
# see the README's "Verification". fp16 and bf16 keep nearly every answer.
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_AGREEMENT = 0.9
# int8 and palettes cost more. Measured on the trained digits (README, "Compression"): every
# correct mode keeps top-1 agreement >= 0.89 and mean cosine >= 0.93, while deliberately broken
# quantizations (per-tensor int8 on depthwise layers, a reversed palette) fall to 0.10-0.13
# and 0.05-0.11. 0.8 sits between the two: below it the figures no longer describe the model.
QUANTIZED_MIN_COSINE = 0.8
QUANTIZED_MIN_AGREEMENT = 0.8

QUANTIZE_MODES = ("w8", "w8a8", "pal8", "pal6", "pal4", "fp16")
"""Every `--quantize` mode of some target; `compress.TARGET_MODES` says which target does which
(tests/test_quantize.py checks the two agree)."""
SENSITIVITY_MODES = ("w8", "w8a8")
"""The int8-weight modes `report --sensitivity` tries layer by layer."""
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_METHOD = "minmax"

LAYOUTS = ("apple", "timm", "mmpretrain")
"""Layouts of every MobileOne S0-S4, between which any (folded) file converts."""
YANGJIE = "yangjie"
MOBILEONE_LAYOUTS = (*LAYOUTS, YANGJIE)
"""Every MobileOne layout a checkpoint is recognised in; yangjie holds only S0."""
REPVIT_LAYOUTS = ("timm", "thumig")
"""RepViT layouts: timm's names are canonical, THU-MIG's differ by module path only."""
ALL_LAYOUTS = tuple(dict.fromkeys((*MOBILEONE_LAYOUTS, *REPVIT_LAYOUTS)))
"""Every `--layout` name of any family; which ones a model takes: `checkpoint.output_layouts`."""

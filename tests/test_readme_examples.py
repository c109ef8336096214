"""The README's example outputs are what the commands really print (scripts/readme_examples.py)."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_examples",
                                                  ROOT / "scripts" / "readme_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_marked_example_output_is_a_real_run() -> None:
    readme_examples = script()
    current = readme_examples.README.read_text()
    arguments = readme_examples.examples(current)
    # The first step, a fold, every table of inspect and report, and both kinds of error.
    for expected in ("demo", "inspect mobileone-demo/mobileone_s0_train.pth",
                     "fold mobileone-demo/mobileone_s0_train.pth -o s0.safetensors"):
        assert expected in arguments
    assert any(a.startswith("report ") for a in arguments)
    assert any("--jsn" in a for a in arguments) and any("--json" in a for a in arguments)
    fresh = readme_examples.regenerate(current)
    drift = "".join(difflib.unified_diff(current.splitlines(keepends=True),
                                         fresh.splitlines(keepends=True)))
    assert fresh == current, f"run `python scripts/readme_examples.py --write`:\n{drift}"


def test_a_drifted_block_is_found() -> None:
    readme_examples = script()
    text = ("<!-- readme-example: inspect --jsn -->\n```console\n$ mobileone inspect --jsn\n"
            "error: something else\n```\n")
    fresh = readme_examples.regenerate(text, demo_first=False)
    assert fresh != text and "error: no such option '--jsn'" in fresh
    assert readme_examples.regenerate(fresh, demo_first=False) == fresh

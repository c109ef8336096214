"""Third-party output stays off stdout: descriptor-level capture, and the --opset 25 case."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from mobileone_cli.quiet import captured, last_meaningful_line

ROOT = Path(__file__).resolve().parent.parent


def test_captures_c_and_python_writes_in_order_and_restores(capfd: object) -> None:
    libc = ctypes.CDLL(None)
    with captured() as output:
        print("python stdout")
        os.write(1, b"descriptor 1\n")
        print("python stderr", file=sys.stderr)
        os.write(2, b"descriptor 2\n")
        libc.printf(b"c stdio %d\n", 42)  # buffered by C: must be flushed before restoring
    # C's stdio buffer reaches the file when flushed; the unbuffered writes land in order.
    assert output.text.splitlines() == ["python stdout", "descriptor 1", "python stderr",
                                        "descriptor 2", "c stdio 42"]
    print("after")
    os.write(1, b"after, descriptor\n")
    seen = capfd.readouterr()  # type: ignore[attr-defined]
    assert seen.out == "after\nafter, descriptor\n" and seen.err == ""


def test_descriptors_are_restored_when_the_body_raises(capfd: object) -> None:
    try:
        with captured():
            os.write(1, b"lost\n")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    os.write(1, b"kept\n")
    assert capfd.readouterr().out == "kept\n"  # type: ignore[attr-defined]


def test_the_last_meaningful_line_skips_frames_and_graph_dumps() -> None:
    text = ("Torch IR graph at exception: graph(%input.1 : Float(1, 3),\n"
            "  %4432 : Float(1, 1000) = aten::linear(%4431)\n  return (%4432)\n\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
            "    ^^^^^^\nRuntimeError: Unsupported onnx_opset_version: 25\n\n")
    assert last_meaningful_line(text) == "RuntimeError: Unsupported onnx_opset_version: 25"
    with captured() as output:
        os.write(1, text.encode())
    assert output.last_line(ValueError("")) == "RuntimeError: Unsupported onnx_opset_version: 25"
    assert output.last_line(ValueError("first\nthe cause")) == "the cause"


def test_an_unsupported_opset_is_exit_4_with_the_converters_line(s0_checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    """torch.onnx dumps ~190 lines of IR on descriptor 1 here; none may reach stdout."""
    command = [sys.executable, "-m", "mobileone_cli", "export", str(s0_checkpoint), "--to",
               "onnx", "--opset", "25", "--input-size", "64", "-o", str(tmp_path / "s0.onnx")]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run([*command, "-q"], capture_output=True, text=True, env=environment)
    assert plain.returncode == 4 and plain.stdout == ""
    assert plain.stderr.splitlines() == [
        "error: torch.onnx could not export the model: Unsupported onnx_opset_version: 25",
        plain.stderr.splitlines()[1],
    ]
    assert plain.stderr.splitlines()[1].startswith("hint: ")
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True,
                             env=environment)
    assert as_json.returncode == 4
    error = json.loads(as_json.stdout)["error"]
    assert error["code"] == 4 and error["message"].endswith("Unsupported onnx_opset_version: 25")
    assert list(tmp_path.iterdir()) == []

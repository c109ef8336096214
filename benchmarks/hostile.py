"""Peak memory of `mobileone inspect` on hostile archives, for benchmarks/results.md.

    python benchmarks/hostile.py TREE [TREE...]

TREE is a checkout whose `mobileone_cli` is measured (PYTHONPATH=TREE), so the same
files measure the code before and after a change. Files (a 2 GiB zip bomb: data.pkl
inflating to 2 GiB; a 3 GB deflated tensor record) are built once in a temporary folder
from a seeded S0 checkpoint; each run goes through benchmarks/peak.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fixtures.hostile import oversized_tensor_record, zip_bomb

BOMB_BYTES = 2 << 30
RECORD_BYTES = 3 * 10**9


def measure(tree: str, checkpoint: Path) -> dict[str, object]:
    environment = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE / "peak.py"), sys.executable, "-m", "mobileone_cli",
               "inspect", str(checkpoint)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True,
                               env=environment)
    result = json.loads(completed.stdout)
    error = next((line for line in result["stderr"].splitlines() if line.startswith("error")),
                 "")
    return {"tree": tree, "file": checkpoint.name, "exit": result["returncode"],
            "peak_mib": round(result["peak_mib"]), "seconds": round(result["seconds"], 1),
            "error": error[:200]}


def main() -> None:
    from mobileone_cli.synthetic import make_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        base = make_checkpoint(Path(folder) / "s0.pth", variant="s0", seed=0,
                               wrapper="state_dict")
        files = [base,
                 zip_bomb(base, Path(folder) / "bomb.pth", pickle_bytes=BOMB_BYTES),
                 oversized_tensor_record(base, Path(folder) / "record.pth",
                                         record_bytes=RECORD_BYTES)]
        for path in files:
            print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB on disk", flush=True)
        for tree in sys.argv[1:]:
            for path in files:
                print(json.dumps(measure(tree, path)), flush=True)


if __name__ == "__main__":
    main()

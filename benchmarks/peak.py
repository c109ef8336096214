"""Run one command and print its wall time, CPU time and peak resident memory as one JSON line.

    python benchmarks/peak.py COMMAND [ARGS...]

`getrusage(RUSAGE_CHILDREN).ru_maxrss` is the largest peak of *all* the
children a process ever waited for, so each measurement needs a process of its
own: `run.py` starts this wrapper once per command, and the figure is the
command's alone. Standard library only, so the wrapper itself weighs nothing.

On a machine shared with other jobs, a torch process's wall time (and even its
CPU time: idle OpenMP threads spin while they wait for a descheduled peer) can
grow several-fold, so the wrapper also reports `others_share`: the fraction of
the machine's CPU capacity that other processes used while the command ran.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

OUTPUT_TAIL = 4000
"""Characters of the command's stdout and stderr passed back (for errors and floor phases)."""


def peak_mib(maxrss: int) -> float:
    """ru_maxrss in MiB: Linux reports KiB, macOS bytes."""
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # user..steal: guest time is already counted in user time.
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_share(busy_before: float | None, busy_after: float | None, *, own_cpu: float,
                 seconds: float) -> float | None:
    """Fraction of all cores' capacity over `seconds` used by processes other than ours."""
    if busy_before is None or busy_after is None or seconds <= 0:
        return None
    others = busy_after - busy_before - own_cpu
    return max(0.0, others) / (seconds * (os.cpu_count() or 1))


def main() -> None:
    command = sys.argv[1:]
    busy_before = busy_cpu_seconds()
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    busy_after = busy_cpu_seconds()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = usage.ru_utime + usage.ru_stime
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mib": peak_mib(usage.ru_maxrss),
        "others_share": others_share(busy_before, busy_after, own_cpu=cpu_seconds,
                                     seconds=seconds),
        "returncode": completed.returncode,
        "stdout": completed.stdout[-OUTPUT_TAIL:],
        "stderr": completed.stderr[-OUTPUT_TAIL:],
    }))


if __name__ == "__main__":
    main()

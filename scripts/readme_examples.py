"""Regenerate (--write) or check (--check) the README's example outputs from real runs.

Every console block of README.md preceded by a marker

    <!-- readme-example: ARGUMENTS -->

is the output of `mobileone ARGUMENTS`, run by this script in a scratch folder
where `mobileone demo` has run first, as a reader would after the README's first
step: stdout and stderr as a terminal shows them (interleaved, no colour, 80
columns), trailing spaces trimmed. The block's first line is `$ mobileone
ARGUMENTS`. Runs are in-process with one torch thread, so the figures (and the
hashes of files whose metadata holds them) are the same on every run; volatile
text (latency) is not shown in marked blocks.

    python scripts/readme_examples.py --check   # exit 1 and a diff when the README drifted
    python scripts/readme_examples.py --write   # rewrite the blocks in place
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(
    r"(?P<marker><!-- readme-example: (?P<arguments>.+?) -->\n)```console\n(?P<block>.*?)```",
    re.DOTALL,
)
ENVIRONMENT = {"NO_COLOR": "1", "COLUMNS": "80", "TERM": "dumb"}


def run(arguments: str, *, folder: Path) -> str:
    """What a terminal shows for `mobileone ARGUMENTS` run in `folder`, as a console block."""
    from click.testing import CliRunner

    from mobileone_cli.cli import main

    with working_directory(folder):
        result = CliRunner(env=ENVIRONMENT).invoke(main, shlex.split(arguments),
                                                   prog_name="mobileone")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise RuntimeError(f"`mobileone {arguments}` crashed") from result.exception
    lines = [f"$ mobileone {arguments}", *result.output.rstrip("\n").splitlines()]
    return "\n".join(line.rstrip() for line in lines) + "\n"


@contextlib.contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def regenerate(text: str, *, demo_first: bool = True) -> str:
    """`text` with every marked block replaced by the output of a real run.

    `demo_first` runs `mobileone demo` beforehand, making the files the examples use.
    """
    import torch

    torch.set_num_threads(1)  # thread scheduling can move the last digit of an fp32 sum
    with tempfile.TemporaryDirectory(prefix="readme-examples-") as scratch:
        folder = Path(scratch)
        if demo_first:
            run("-q demo", folder=folder)  # the README's first step

        def replace(match: re.Match[str]) -> str:
            output = run(match.group("arguments"), folder=folder)
            return f"{match.group('marker')}```console\n{output}```"

        return MARKER.sub(replace, text)


def examples(text: str) -> list[str]:
    """The arguments of every marked block, in README order."""
    return [match.group("arguments") for match in MARKER.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when the README drifted")
    mode.add_argument("--write", action="store_true", help="rewrite the README's blocks")
    options = parser.parse_args(argv)
    current = README.read_text()
    fresh = regenerate(current)
    if options.write:
        README.write_text(fresh)
        print(f"README.md: {len(examples(current))} example outputs regenerated")
        return 0
    if fresh == current:
        return 0
    sys.stdout.writelines(difflib.unified_diff(current.splitlines(keepends=True),
                                               fresh.splitlines(keepends=True),
                                               "README.md", "README.md (real runs)"))
    print("README examples drifted: run `python scripts/readme_examples.py --write`",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout: import this tree's mobileone_cli
    sys.exit(main())

"""RepViT through the pipeline the MobileOne family uses: demo, image-input Core ML, names,
and keeping the distillation head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from mobileone_cli import api
from mobileone_cli.cli import main
from mobileone_cli.options import CoreMLOptions, ExportOptions, FoldOptions
from mobileone_cli.synthetic import make_repvit_checkpoint

SIZE = 64


@pytest.fixture(scope="module")
def repvit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repvit_checkpoint(tmp_path_factory.mktemp("repvit") / "m0_9.pth")


def test_demo_builds_and_folds_a_repvit(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--family", "repvit", "-o", str(tmp_path),
                                       "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["variant"], report["layout"], report["passed"]) == ("m0_9", "timm", True)
    assert Path(report["artifacts"][0]["path"]) == tmp_path / "repvit_m0_9.safetensors"


def test_an_image_input_core_ml_repvit_is_proven(repvit: Path, tmp_path: Path) -> None:
    result = api.export(ExportOptions(source=repvit, targets=("coreml",), input_size=SIZE,
                                      output=tmp_path / "repvit_m0_9.mlpackage",
                                      coreml=CoreMLOptions(image_input=True)))
    assert result.written, result.to_dict()
    [artifact] = result.artifacts
    assert artifact.verification is not None and artifact.verification.passed
    assert artifact.declared is not None and artifact.declared.details["image_input"] is True


def _heads(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return sorted({key.rsplit(".", 1)[0] for key in handle.keys() if key.startswith("head")})


def test_the_distillation_head_is_averaged_unless_kept(repvit: Path, tmp_path: Path) -> None:
    averaged = api.fold(FoldOptions(checkpoint=repvit, output=tmp_path / "one.safetensors",
                                    input_size=SIZE))
    kept = api.fold(FoldOptions(checkpoint=repvit, output=tmp_path / "two.safetensors",
                                input_size=SIZE, keep_distillation_head=True))
    assert averaged.passed and kept.passed
    assert len(_heads(tmp_path / "two.safetensors")) == len(_heads(tmp_path / "one.safetensors")) + 1
    # Both compute the same function: the two heads' average, once folded into one Linear.
    assert kept.fold_verification.max_rel_diff <= kept.fold_verification.rtol

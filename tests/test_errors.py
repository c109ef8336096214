"""One error class per exit code: the code, the classes and the README's table agree."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from mobileone_cli import errors

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _error_classes() -> list[type[errors.MobileOneError]]:
    return [value for value in vars(errors).values()
            if inspect.isclass(value) and issubclass(value, errors.MobileOneError)]


def test_every_documented_failure_code_has_exactly_one_class() -> None:
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", README, re.MULTILINE)}
    failures = documented - {errors.EXIT_OK, errors.EXIT_INTERRUPTED}
    assert set(errors.EXIT_CODE_CLASSES) == failures
    for code, cls in errors.EXIT_CODE_CLASSES.items():
        assert cls.exit_code == code
        assert cls.__bases__ == (errors.MobileOneError,)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_is_a_kind_of_one_exit_code_class(
    cls: type[errors.MobileOneError],
) -> None:
    if cls is errors.MobileOneError:
        return
    [owner] = [base for base in errors.EXIT_CODE_CLASSES.values() if issubclass(cls, base)]
    assert cls.exit_code == owner.exit_code
    assert cls.__doc__, f"{cls.__name__} says nothing about when it is raised"


def test_usage_errors_exit_2_as_documented() -> None:
    assert errors.UsageError("x").exit_code == errors.EXIT_USAGE == 2
    assert errors.BadArtifactError("x").exit_code == errors.EXIT_BAD_INPUT == 1

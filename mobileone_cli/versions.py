"""Installed versions of the tool's stack, read from package metadata (no imports)."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata

from mobileone_cli import __version__


def version_of(distribution: str) -> str | None:
    """The installed version of a pip distribution, None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def stack_versions(distributions: Iterable[str], *, absent: str | None = None,
                   ) -> dict[str, str]:
    """mobileone's, Python's and each distribution's version; an absent one as `absent`
    (left out when `absent` is None)."""
    versions = {"mobileone": __version__, "python": platform.python_version()}
    for name in distributions:
        found = version_of(name)
        if found is not None:
            versions[name] = found
        elif absent is not None:
            versions[name] = absent
    return versions

"""Which lmdeploy releases the run-time patches know, and the guard that refuses others.

Anchor: OpenTelemetry instrumentations declare the library range they instrument
(``_instruments``) and skip a version outside it. Here the guard raises instead, since a
patch applied to a layout it was not written for would corrupt the scheduler.
"""

from __future__ import annotations

import re
from importlib import metadata

from sagellm.core.errors import ConfigError

__all__ = [
    "SUPPORTED_SERIES",
    "UnsupportedLMDeployVersionError",
    "check_version",
    "installed_version",
    "series_of",
]

#: Release series the patches are written for: 0.11.x (single-module trie, phase-based
#: scheduling) and 0.18.x (trie package, tentative prefix matches, communicators).
SUPPORTED_SERIES: tuple[str, ...] = ("0.11", "0.18")


class UnsupportedLMDeployVersionError(ConfigError):
    """The installed lmdeploy is a release the patches do not know."""


def installed_version() -> str | None:
    """lmdeploy's version from its distribution metadata, or ``None`` if not installed."""
    try:
        return metadata.version("lmdeploy")
    except metadata.PackageNotFoundError:
        return None


def series_of(version: str) -> str:
    """``"0.18.0"`` -> ``"0.18"``; pre-release and local tags belong to their series."""
    match = re.match(r"^(\d+)\.(\d+)", version.strip())
    if match is None:
        raise UnsupportedLMDeployVersionError(
            f"cannot read lmdeploy version {version!r}; expected MAJOR.MINOR[.PATCH]"
        )
    return f"{int(match.group(1))}.{int(match.group(2))}"


def check_version(version: str) -> str:
    """Return the patch series for ``version``; raise if the patches do not know it."""
    series = series_of(version)
    if series not in SUPPORTED_SERIES:
        known = ", ".join(f"{s}.x" for s in SUPPORTED_SERIES)
        raise UnsupportedLMDeployVersionError(
            f"lmdeploy {version} is not supported by sageLLM's run-time patches "
            f"(they know {known}); install one of those, e.g. "
            f"`pip install --no-deps lmdeploy=={SUPPORTED_SERIES[-1]}.0`"
        )
    return series

"""Shared fixtures: a temporary distribution with entry points, seen by importlib.metadata."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sagellm.core import platforms, registry

FakeDist = Callable[..., Path]


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDist]:
    """Install a fake distribution: ``fake_dist(name, version, entry_points, modules)``.

    ``entry_points`` maps a group to ``{name: "module:attr"}``; ``modules`` maps module
    names to their source. The folder is put on sys.path, so importlib.metadata finds
    the ``*.dist-info`` and the modules import.
    """
    created: list[str] = []

    def make(
        name: str,
        version: str,
        entry_points: dict[str, dict[str, str]],
        modules: dict[str, str] | None = None,
    ) -> Path:
        root = tmp_path / f"site-{name}"
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{k} = {v}" for k, v in eps.items())
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for mod, src in (modules or {}).items():
            (root / f"{mod}.py").write_text(textwrap.dedent(src))
            created.append(mod)
        monkeypatch.syspath_prepend(str(root))
        registry.reset_cache()
        platforms.reset_cache()
        return root

    monkeypatch.delenv("SAGELLM_PLUGINS", raising=False)
    yield make
    for mod in created:
        sys.modules.pop(mod, None)
    registry.reset_cache()
    platforms.reset_cache()

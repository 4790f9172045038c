"""The import contracts of pyproject.toml catch the imports DESIGN 2 forbids.

Each test copies the repository's pyproject.toml and every package's ``src/`` to a temporary
folder, injects one import, and runs lint-imports there against the copy (the real
folders are removed from ``sys.path`` in that process). Packages not written yet are
stood in for by one-module packages, so every rule is exercised whatever exists.
Run by ``nox -s contracts`` (an environment with import-linter and every package installed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sagellm_repo as repo  # noqa: E402

RESEARCH_CONTRACT = "Research packages are independent of each other and of sagellm.engine"
CORE_CONTRACT = "sagellm.core imports no other sagellm package"

# Run lint-imports on the copy only: drop the real src folders from sys.path (editable
# installs put them there), then put the copy's src folders first.
_RUNNER = """
import os, sys
real = set(os.environ["REAL_SRCS"].split(os.pathsep))
sys.path[:] = [p for p in sys.path if os.path.realpath(p) not in real]
sys.path[:0] = sys.argv[1:]
from importlinter.cli import lint_imports_command
lint_imports_command.main(args=["--no-cache"], prog_name="lint-imports")
"""


def _copy_repo(dest: Path) -> list[Path]:
    """Copy pyproject.toml and each package's src/; add stand-ins; return the src folders."""
    shutil.copy(repo.ROOT / "pyproject.toml", dest / "pyproject.toml")
    srcs = []
    for folder in repo.discover():
        src = repo.ROOT / folder / "src"
        if src.is_dir():
            shutil.copytree(
                src, dest / folder / "src", ignore=shutil.ignore_patterns("__pycache__")
            )
            srcs.append(dest / folder / "src")
    standin = dest / "standins" / "src"
    for module in ("sagellm.kv_pool", "sagellm.prefix_cache", "sagellm.eviction", "sagellm.engine"):
        if not any((s / module.replace(".", "/")).is_dir() for s in srcs):
            pkg = standin / module.replace(".", "/")
            pkg.mkdir(parents=True)
            (pkg / "__init__.py").write_text(
                f'"""Stand-in for {module}."""\n\nimport sagellm.core\n'
            )
    if standin.is_dir():
        srcs.append(standin)
    return srcs


def _module_file(srcs: list[Path], module: str) -> Path:
    """A module of ``module`` to inject into: its first non-init module, else __init__.py."""
    for src in srcs:
        pkg = src / module.replace(".", "/")
        if pkg.is_dir():
            modules = sorted(
                p for p in pkg.glob("*.py") if p.name not in ("__init__.py", "_version.py")
            )
            return modules[0] if modules else pkg / "__init__.py"
    raise AssertionError(f"{module} not in the copy")


def _lint(copy: Path, srcs: list[Path]) -> subprocess.CompletedProcess[str]:
    real = [str((p.path / "src").resolve()) for p in repo.discover().values()]
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, *map(str, srcs)],
        cwd=copy,
        env={**os.environ, "REAL_SRCS": os.pathsep.join(real)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _inject(path: Path, module: str) -> None:
    path.write_text(path.read_text() + f"\nimport {module}  # injected by test_contracts\n")


@pytest.fixture
def copy(tmp_path: Path) -> tuple[Path, list[Path]]:
    return tmp_path, _copy_repo(tmp_path)


def test_the_unmodified_copy_keeps_every_contract(copy: tuple[Path, list[Path]]) -> None:
    done = _lint(*copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{RESEARCH_CONTRACT} KEPT" in done.stdout
    assert f"{CORE_CONTRACT} KEPT" in done.stdout


def test_a_research_package_importing_another_one_breaks_the_contract(
    copy: tuple[Path, list[Path]],
) -> None:
    victim = _module_file(copy[1], "sagellm.prefix_cache")
    _inject(victim, "sagellm.kv_pool")
    done = _lint(*copy)
    assert done.returncode != 0
    assert f"{RESEARCH_CONTRACT} BROKEN" in done.stdout, done.stdout + done.stderr
    assert "sagellm.prefix_cache is not allowed to import sagellm.kv_pool" in done.stdout


def test_a_research_package_importing_the_engine_breaks_the_contract(
    copy: tuple[Path, list[Path]],
) -> None:
    _inject(_module_file(copy[1], "sagellm.eviction"), "sagellm.engine")
    done = _lint(*copy)
    assert done.returncode != 0
    assert f"{RESEARCH_CONTRACT} BROKEN" in done.stdout, done.stdout + done.stderr
    assert "sagellm.eviction is not allowed to import sagellm.engine" in done.stdout


def test_core_importing_a_research_package_breaks_the_core_contract(
    copy: tuple[Path, list[Path]],
) -> None:
    _inject(_module_file(copy[1], "sagellm.core"), "sagellm.kv_pool")
    done = _lint(*copy)
    assert done.returncode != 0
    assert f"{CORE_CONTRACT} BROKEN" in done.stdout, done.stdout + done.stderr

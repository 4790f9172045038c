"""Packaging rules every package folder follows, checked with every package installed.

Run by ``nox -s integration``: PEP 420 layout, versions, dependency pins (DESIGN 1 and 2),
entry points that load and carry a strict config, the meta-distribution covering every
package, and ``import sagellm.core`` leaving torch unimported.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sagellm_repo as repo  # noqa: E402

PACKAGES = repo.discover()
FOLDERS = list(PACKAGES)
#: Local packages the engine may depend on (DESIGN 2).
# memory management and scheduling (an engine cannot run without them), and the
# quantizers and kernels the default engine computes with (it loads every one of them
# through entry points by name, so a third-party package can replace any)
ENGINE_DEPS = {
    repo.CORE,
    "sagellm-kv-pool",
    "sagellm-scheduler-ir",
    "sagellm-quantization",
    "sagellm-kernel-fusion",
}


def _pyproject(folder: str) -> dict:
    return repo.tomllib.loads((repo.ROOT / folder / "pyproject.toml").read_text())


@pytest.mark.parametrize("folder", FOLDERS)
def test_layout_is_a_pep420_portion_with_version_and_marker(folder: str) -> None:
    pkg = PACKAGES[folder]
    src = pkg.path / "src"
    assert not (src / "sagellm" / "__init__.py").exists(), (
        f"{folder}/src/sagellm/__init__.py hides every other sagellm package: delete it"
    )
    package_dir = src / pkg.module.replace(".", "/")
    assert (package_dir / "__init__.py").is_file()
    assert (package_dir / "py.typed").is_file(), f"{folder}: add {package_dir}/py.typed"
    module = importlib.import_module(f"{pkg.module}._version")
    assert module.__version__ == md.version(folder)
    assert Path(importlib.import_module(pkg.module).__file__).is_relative_to(package_dir)


@pytest.mark.parametrize("folder", FOLDERS)
def test_pyproject_follows_the_package_template(folder: str) -> None:
    data = _pyproject(folder)
    project = data["project"]
    assert project["name"] == folder
    assert project["dynamic"] == ["version"]
    assert project["requires-python"] == ">=3.10"
    assert project["license"] == "Apache-2.0"
    assert data["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["src/sagellm"]
    assert PACKAGES[folder].test_extra is not None, f"{folder}: add a `test` extra"


@pytest.mark.parametrize("folder", FOLDERS)
def test_local_dependencies_follow_the_dependency_rules(folder: str) -> None:
    local = {}
    for raw in PACKAGES[folder].dependencies:
        req = Requirement(raw)
        if repo.is_sagellm(req.name):
            local[repo.canonical(req.name)] = req
    if folder == repo.CORE:
        assert local == {}
        return
    allowed = ENGINE_DEPS if folder == repo.ENGINE else {repo.CORE}
    assert repo.CORE in local, f"{folder} must depend on sagellm-core"
    assert set(local) <= allowed, f"{folder} may depend on {sorted(allowed)} only: {sorted(local)}"
    for name, req in local.items():
        ops = {spec.operator for spec in req.specifier}
        assert {">=", "<"} <= ops, f"{folder}: pin {name} to a range like >=0.1,<0.2: {req}"
    torch = [
        Requirement(r) for r in PACKAGES[folder].dependencies if Requirement(r).name == "torch"
    ]
    for req in torch:
        assert "==" not in {s.operator for s in req.specifier}, (
            f"{folder}: do not pin torch exactly"
        )


def _sagellm_entry_points() -> list[md.EntryPoint]:
    found = []
    for dist in md.distributions():
        if repo.is_sagellm(dist.metadata["Name"]):
            found += [ep for ep in dist.entry_points if ep.group.startswith("sagellm.")]
    return sorted(found, key=lambda ep: (ep.group, ep.name))


def test_every_entry_point_group_is_a_known_slot() -> None:
    groups = set(repo.slot_groups().values())
    unknown = [f"{ep.group}:{ep.name}" for ep in _sagellm_entry_points() if ep.group not in groups]
    assert unknown == [], f"groups not in sagellm.core.registry.GROUPS: {unknown}"


@pytest.mark.parametrize("ep", _sagellm_entry_points(), ids=lambda ep: f"{ep.group}:{ep.name}")
def test_every_entry_point_loads_with_a_strict_frozen_config(ep: md.EntryPoint) -> None:
    obj = ep.load()
    config_class = getattr(obj, "config_class", None)
    if config_class is None:
        return  # an implementation without options
    assert issubclass(config_class, BaseModel)
    assert config_class.model_config.get("extra") == "forbid", f"{ep.value}: extra='forbid'"
    assert config_class.model_config.get("frozen") is True, f"{ep.value}: frozen=True"


def test_the_meta_distribution_installs_every_package() -> None:
    required = {repo.requirement_name(r) for r in repo.meta_requirements(["all"])}
    missing = sorted(set(FOLDERS) - required)
    assert missing == [], f"add {missing} to an extra of the root pyproject.toml"
    base = {repo.requirement_name(r) for r in repo.meta_project()["dependencies"]}
    assert base == {repo.CORE, repo.ENGINE}


def test_importing_core_does_not_import_torch() -> None:
    code = (
        "import sys, sagellm.core, sagellm.core.registry, sagellm.core.config, "
        "sagellm.core.protocols, sagellm.core.types; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

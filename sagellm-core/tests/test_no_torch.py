"""sagellm.core imports and works without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any import of torch now raises ImportError
    import sagellm.core, sagellm.core.protocols, sagellm.core.types, sagellm.core.registry
    import sagellm.core.config, sagellm.core.platforms, sagellm.core.ports
    import sagellm.core.errors, sagellm.core.telemetry
    from sagellm.core import platforms
    from sagellm.core.__main__ import collect
    data = collect()
    out = {
        "current": platforms.current_platform().name,
        "cuda": platforms.get_platform("cuda").is_available(),
        "cpu_total": platforms.get_platform("cpu").memory_info()[1] > 0,
        "torch_loaded": sys.modules.get("torch") is not None,
        "groups": sorted(data["groups"]),
    }
    print(__import__("json").dumps(out))
    """
)


def test_core_needs_no_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["current"] == "cpu"
    assert out["cuda"] is False
    assert out["cpu_total"] is True
    assert out["torch_loaded"] is False
    assert "kv_pool" in out["groups"]


def test_importing_core_does_not_import_torch_or_the_kit() -> None:
    code = (
        "import sys, sagellm.core.platforms, sagellm.core.config, sagellm.core.ports; "
        "print('torch' in sys.modules, 'sagellm.core.testing' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]

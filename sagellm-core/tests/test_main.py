"""python -m sagellm.core"""

from __future__ import annotations

import json

import pytest
from conftest import FakeDist

from sagellm.core.__main__ import main


def test_lists_plugins_with_distribution_version_and_errors(
    fake_dist: FakeDist, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_dist(
        "fake-evict",
        "2.0.1",
        {"sagellm.eviction": {"zz-good": "fake_evict_mod:Policy", "zz-broken": "fake_evict_bad:X"}},
        {
            "fake_evict_mod": "class Policy:\n    pass\n",
            "fake_evict_bad": "import no_such_module_xyz\n",
        },
    )
    assert main([]) == 1
    text = capsys.readouterr().out
    assert "sagellm.eviction:" in text
    good = next(line for line in text.splitlines() if "zz-good" in line)
    assert "fake-evict 2.0.1" in good and good.rstrip().endswith("ok")
    bad = next(line for line in text.splitlines() if "zz-broken" in line)
    assert "IMPORT ERROR: No module named 'no_such_module_xyz'" in bad
    assert "platforms:" in text and "current platform:" in text

    assert main(["--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in data["groups"]["eviction"]}
    assert rows["zz-good"]["distribution"] == "fake-evict"
    assert rows["zz-good"]["version"] == "2.0.1"
    assert rows["zz-good"]["error"] is None
    assert rows["zz-broken"]["error"] == "No module named 'no_such_module_xyz'"
    assert [p["name"] for p in data["platforms"]][:3] == ["cpu", "cuda", "rocm"]

"""asv benchmarks of sagellm.domestic_interconnect.

``Detect`` times a sysfs-only ``detect()`` of a synthetic tree (16, 64 and 256 PCI
functions, one in four an Ascend NPU; warm page cache) and of this machine's ``/``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sagellm.domestic_interconnect import detect
from sagellm.domestic_interconnect.bench import write_tree


class Detect:
    params = [["live", 16, 64, 256]]
    param_names = ["functions"]

    def setup(self, functions: int | str) -> None:
        self.folder: str | None = None
        if functions == "live":
            self.root = "/"
        else:
            self.folder = tempfile.mkdtemp(prefix="sagellm-di-asv-")
            self.root = str(write_tree(Path(self.folder), int(functions)))
        detect(self.root, use_smi=False)

    def teardown(self, functions: int | str) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def time_detect(self, functions: int | str) -> None:
        detect(self.root, use_smi=False)

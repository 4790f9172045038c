"""sagellm.topology: sysfs/procfs topology detection with an alpha-beta cost per link.

Usage::

    from sagellm.topology import SysfsTopologyDetector, TopologyConfig

    info = SysfsTopologyDetector(TopologyConfig()).detect()   # this machine
    info.device_type, info.num_devices, info.links             # core's TopologyInfo
    detector = SysfsTopologyDetector(TopologyConfig(root="tests/fixtures/aws-p4d-8gpu"))
    detector.detect(); detector.machine.accelerators            # the full scan
"""

from sagellm.topology._version import __version__
from sagellm.topology.config import TopologyConfig
from sagellm.topology.costs import LinkCost, fit_alpha_beta
from sagellm.topology.detector import SysfsTopologyDetector, calibrate_shm
from sagellm.topology.machine import Machine
from sagellm.topology.sysfs import read_machine

__all__ = [
    "LinkCost",
    "Machine",
    "SysfsTopologyDetector",
    "TopologyConfig",
    "__version__",
    "calibrate_shm",
    "fit_alpha_beta",
    "read_machine",
]

"""sagellm.domestic_interconnect: Ascend, Cambricon, Hygon, Kunlun and MetaX for sageLLM.

Usage::

    from sagellm.core.platforms import get_platform
    from sagellm.domestic_interconnect import detect, summarize

    print(summarize(detect()))            # what the PCI bus holds, no torch extension needed
    p = get_platform("ascend")            # AscendPlatform, through the sagellm.platform group
    p.is_available(), p.device_count()    # torch_npu and a device needed for True / > 0

    from sagellm.core import registry
    comm = registry.load("comm_backend", "hccl", rank=r, world_size=w,
                         init_method="tcp://10.0.0.1:29500")
"""

from sagellm.domestic_interconnect._version import __version__
from sagellm.domestic_interconnect.comm import (
    REDUCE_OPS,
    BkclCommBackend,
    CnclCommBackend,
    HcclCommBackend,
    VendorCommBackend,
    VendorCommConfig,
    ensure_backend,
)
from sagellm.domestic_interconnect.detect import (
    SMI_TOOLS,
    VENDORS,
    DetectedDevice,
    Vendor,
    detect,
    scan_sysfs,
    smi_tools,
    summarize,
)
from sagellm.domestic_interconnect.platforms import (
    DOMESTIC_PLATFORM_CLASSES,
    AscendPlatform,
    CambriconPlatform,
    HygonPlatform,
    KunlunPlatform,
    MetaxPlatform,
)

__all__ = [
    "DOMESTIC_PLATFORM_CLASSES",
    "REDUCE_OPS",
    "SMI_TOOLS",
    "VENDORS",
    "AscendPlatform",
    "BkclCommBackend",
    "CambriconPlatform",
    "CnclCommBackend",
    "DetectedDevice",
    "HcclCommBackend",
    "HygonPlatform",
    "KunlunPlatform",
    "MetaxPlatform",
    "Vendor",
    "VendorCommBackend",
    "VendorCommConfig",
    "__version__",
    "detect",
    "ensure_backend",
    "scan_sysfs",
    "smi_tools",
    "summarize",
]

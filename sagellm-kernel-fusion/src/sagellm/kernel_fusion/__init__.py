"""sagellm.kernel_fusion: one line on what this package provides.

Usage::

    from sagellm.kernel_fusion.config import KernelFusionConfig

    config = KernelFusionConfig()
"""

from sagellm.kernel_fusion._version import __version__

__all__ = ["__version__"]

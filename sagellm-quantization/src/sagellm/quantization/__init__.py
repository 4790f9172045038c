"""sagellm.quantization: one line on what this package provides.

Usage::

    from sagellm.quantization.config import QuantizationConfig

    config = QuantizationConfig()
"""

from sagellm.quantization._version import __version__

__all__ = ["__version__"]

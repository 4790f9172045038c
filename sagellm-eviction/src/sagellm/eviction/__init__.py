"""sagellm.eviction: one line on what this package provides.

Usage::

    from sagellm.eviction.config import EvictionConfig

    config = EvictionConfig()
"""

from sagellm.eviction._version import __version__

__all__ = ["__version__"]

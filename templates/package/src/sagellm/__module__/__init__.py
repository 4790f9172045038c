"""{{import}}: one line on what this package provides.

Usage::

    from {{import}}.config import {{Class}}Config

    config = {{Class}}Config()
"""

from {{import}}._version import __version__

__all__ = ["__version__"]

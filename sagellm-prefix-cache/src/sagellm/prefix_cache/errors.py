"""Errors of the prefix indexes (caller mistakes; capacity is never an error here)."""

from __future__ import annotations

from sagellm.core.errors import SageLLMError

__all__ = ["PrefixLockError", "StalePrefixMatchError"]


class StalePrefixMatchError(SageLLMError, ValueError):
    """A :class:`~sagellm.core.types.PrefixMatch` no longer describes the cached blocks.

    Raised by ``lock`` when the matched blocks were evicted or cleared between the lookup
    and the lock, and by ``lock``/``unlock`` for a match from another index.
    """


class PrefixLockError(SageLLMError, ValueError):
    """``unlock`` was called more often than ``lock`` for the same match."""

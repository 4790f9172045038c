"""Errors of the eviction policies (caller mistakes; an empty cache is never an error)."""

from __future__ import annotations

from sagellm.core.errors import SageLLMError

__all__ = ["KeyAlreadyHeldError", "KeyNotHeldError", "NotPinnedError"]


class KeyNotHeldError(SageLLMError, KeyError):
    """``access`` or ``pin`` named a key the policy does not hold (insert it first)."""


class KeyAlreadyHeldError(SageLLMError, ValueError):
    """``insert`` named a key the policy already holds (call ``access`` for a hit)."""


class NotPinnedError(SageLLMError, ValueError):
    """``unpin`` was called more often than ``pin`` for the same key."""

"""Errors of the KV transfer channels."""

from __future__ import annotations

from sagellm.core.errors import SageLLMError

__all__ = ["KVTransferError", "TransportUnavailableError"]


class KVTransferError(SageLLMError, RuntimeError):
    """A transfer failed (the peer left, refused the plan, or the transport broke).

    The message names the peer, the request and what to check.
    """


class TransportUnavailableError(SageLLMError, ImportError):
    """The transport library of a channel is not installed; the message names the package."""

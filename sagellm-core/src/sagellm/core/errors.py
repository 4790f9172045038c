"""Errors raised across sageLLM packages.

Every error derives from :class:`SageLLMError`. Caller mistakes raise a subclass whose
message says what to do. Running out of capacity (no free KV block, a full queue) is a
return value such as ``None``, never an exception; broken internal invariants are
``assert`` statements.
"""

from __future__ import annotations

__all__ = [
    "CapabilityMismatchError",
    "ConfigError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PlatformUnavailableError",
    "PluginLoadError",
    "PluginNotFoundError",
    "RequestAbortedError",
    "SageLLMError",
]


class SageLLMError(Exception):
    """Root of every error raised by sageLLM packages."""


class ConfigError(SageLLMError, ValueError):
    """A configuration value or key is wrong; the message lists what is accepted."""


class PluginNotFoundError(SageLLMError, LookupError):
    """No installed implementation has the requested name in the entry-point group.

    The message names the distribution and the ``sagellm[...]`` extra that provides it.
    """


class PluginLoadError(SageLLMError, ImportError):
    """An installed implementation failed to import or to build; the cause is chained."""


class CapabilityMismatchError(SageLLMError):
    """Two assembled components cannot work together (KV schema, device or dtype)."""


class PlatformUnavailableError(SageLLMError, RuntimeError):
    """The requested device platform is not present on this machine or not installed."""


class ModelNotFoundError(SageLLMError, FileNotFoundError):
    """A model path or embedded model name does not resolve; the message says how to fix it."""


class InvalidRequestError(SageLLMError, ValueError):
    """A generation request is malformed (bad sampling values, prompt too long, ...)."""


class RequestAbortedError(SageLLMError):
    """A request was aborted before it finished (client gone, explicit abort)."""

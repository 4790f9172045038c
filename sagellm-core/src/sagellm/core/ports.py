"""The one place that chooses network ports.

Every service of sageLLM gets its port from :func:`get_port`; no other module writes a
port number. Resolution order for a service ``svc``:

1. ``SAGELLM_<SVC>_PORT`` (for example ``SAGELLM_SERVER_PORT``),
2. ``SAGELLM_PORT`` (the server only: it is the port users mean),
3. the default in :data:`DEFAULT_PORTS` (8000 for the OpenAI server, as in vLLM).

Port 0 is accepted and means "any free port" (the operating system picks it at bind
time). Tests that need a concrete free port call :func:`find_free_port`.

Usage::

    from sagellm.core.ports import get_port
    port = get_port()                 # 8000 unless SAGELLM_PORT / SAGELLM_SERVER_PORT say otherwise
    port = get_port("metrics")        # SAGELLM_METRICS_PORT, else 8001
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

from sagellm.core.errors import ConfigError

__all__ = ["DEFAULT_PORTS", "find_free_port", "get_port", "port_env_var"]

#: Default port of each service.
DEFAULT_PORTS: Mapping[str, int] = {
    "server": 8000,  # OpenAI-compatible HTTP API (vLLM's default)
    "metrics": 8001,  # a separate Prometheus endpoint, when one is wanted
    "control": 8100,  # control plane that routes between engine instances
    "dist": 29500,  # torch.distributed rendezvous (torch's MASTER_PORT default)
}

_SERVICE = re.compile(r"[a-z][a-z0-9_]*")


def port_env_var(service: str) -> str:
    """The environment variable that sets ``service``'s port, e.g. ``SAGELLM_SERVER_PORT``."""
    return f"SAGELLM_{service.upper()}_PORT"


def _parse(raw: str, var: str) -> int:
    text = raw.strip()
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(
            f"{var}={raw!r} is not a port number; use an integer in 0..65535"
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"{var}={port} is out of range; use an integer in 0..65535 (0: any free port)"
        )
    return port


def get_port(service: str = "server", *, environ: Mapping[str, str] | None = None) -> int:
    """The port ``service`` listens on (see the module docstring for the order).

    ``environ`` defaults to ``os.environ``. Raises :class:`ConfigError` for an unknown
    service name or a value that is not a port in 0..65535.
    """
    if not isinstance(service, str) or not _SERVICE.fullmatch(service):
        raise ConfigError(
            f"service name {service!r} must be lower-case letters, digits and '_' "
            f"(known services: {', '.join(DEFAULT_PORTS)})"
        )
    if service not in DEFAULT_PORTS:
        raise ConfigError(
            f"unknown service {service!r}; known services: {', '.join(DEFAULT_PORTS)}"
        )
    env = os.environ if environ is None else environ
    var = port_env_var(service)
    raw = env.get(var)
    if raw is not None and raw.strip():
        return _parse(raw, var)
    if service == "server":
        raw = env.get("SAGELLM_PORT")
        if raw is not None and raw.strip():
            return _parse(raw, "SAGELLM_PORT")
    return DEFAULT_PORTS[service]


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind port 0, read it, close).

    For tests and local launchers; another process may take it before it is used, so a
    server that can should bind port 0 itself instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port

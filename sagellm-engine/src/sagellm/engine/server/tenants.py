"""Who a request belongs to: API keys checked in constant time, each mapped to a tenant.

The tenant is what the engine isolates by: it goes to ``add_request(tenant=...)``, where
it keys the prefix cache (with the request's ``cache_salt``) and owns the KV quota. A
server without keys serves everyone as the tenant ``""``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from sagellm.engine.config import ServerConfig

__all__ = ["Tenant", "Tenants"]


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant and the limits its requests are admitted under."""

    name: str  # passed to the engine as `tenant`
    priority: int | None = None  # default priority of its requests (None: the request's)
    max_concurrent_requests: int | None = None  # None: unlimited
    max_tokens_per_minute: int | None = None  # None: unlimited


class Tenants:
    """The server's keys and tenants.

    Usage::

        tenants = Tenants(ServerConfig(api_keys=["sk-a"]))
        tenant = tenants.authenticate(request.headers.get("authorization"))
        if tenant is None: ...  # 401
    """

    def __init__(self, config: ServerConfig) -> None:
        default = (config.tenant_max_concurrent_requests, config.tenant_max_tokens_per_minute)
        self.anonymous = Tenant("", None, *default)
        # Digests, not keys: every comparison then takes the same time whatever the
        # length of the key or of the token a client sends.
        self._keys: list[tuple[bytes, Tenant]] = []
        for k in config.api_keys:
            tenant = Tenant(
                k.tenant_name(),
                k.priority,
                k.max_concurrent_requests or default[0],
                k.max_tokens_per_minute or default[1],
            )
            self._keys.append((_digest(k.key.get_secret_value()), tenant))

    @property
    def requires_key(self) -> bool:
        """True when clients must send a key."""
        return bool(self._keys)

    @property
    def names(self) -> list[str]:
        """Every configured tenant (the anonymous one when there is no key)."""
        if not self._keys:
            return [self.anonymous.name]
        return list(dict.fromkeys(t.name for _, t in self._keys))

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an ``Authorization`` header value; None when it holds no valid key.

        Without configured keys every request is the anonymous tenant. The token is
        compared with every key, with no early exit, so timing tells nothing about which
        key (if any) was close.
        """
        if not self._keys:
            return self.anonymous
        token = _bearer_token(authorization)
        digest = _digest(token if token is not None else "")
        found: Tenant | None = None
        for key_digest, tenant in self._keys:
            if hmac.compare_digest(digest, key_digest) and found is None:
                found = tenant
        return found if token is not None else None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None

"""Configuration of sagellm.eviction."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EvictionConfig(BaseModel):
    """Options of sagellm.eviction; one commented field per option."""

    model_config = ConfigDict(frozen=True, extra="forbid")

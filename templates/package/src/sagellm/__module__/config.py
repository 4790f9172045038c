"""Configuration of {{import}}."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class {{Class}}Config(BaseModel):
    """Options of {{import}}; one commented field per option."""

    model_config = ConfigDict(frozen=True, extra="forbid")

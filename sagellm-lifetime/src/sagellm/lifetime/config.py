"""Configuration of the lifetime predictor."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OnlineLifetimePredictorConfig"]


class OnlineLifetimePredictorConfig(BaseModel):
    """Options of :class:`~sagellm.lifetime.predictor.OnlineLifetimePredictor`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # upper edges (seconds) of the TTL buckets; one more bucket holds "later or never"
    ttl_bucket_edges: tuple[float, ...] = (1.0, 10.0, 60.0, 300.0)
    # reuse_probability is P(next access within this many seconds); must be an edge
    horizon_seconds: float = 300.0
    # per-update forgetting factor of a histogram cell (1.0: never forget)
    decay: float = Field(0.995, gt=0.0, le=1.0)
    # observations a cell needs before it is trusted over its coarser parent
    min_cell_weight: float = Field(4.0, ge=0.0)
    # tenants are hashed into this many groups in the finest cells
    num_tenant_groups: int = Field(8, ge=1, le=1024)
    # keys whose last access is remembered (oldest forgotten first, without a label)
    max_tracked_keys: int = Field(200_000, ge=1)

    @model_validator(mode="after")
    def _edges(self) -> OnlineLifetimePredictorConfig:
        edges = self.ttl_bucket_edges
        if not edges or any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
            raise ValueError(
                f"ttl_bucket_edges must be positive and strictly increasing, got {edges}"
            )
        if self.horizon_seconds not in edges:
            raise ValueError(
                f"horizon_seconds {self.horizon_seconds} must be one of ttl_bucket_edges {edges}"
            )
        return self

"""The control plane: route OpenAI requests over several sageLLM (or vLLM) workers.

``sagellm router`` (:class:`HTTPRouter` behind :func:`build_router_app`) is the HTTP
front; :class:`ControlPlaneManager` is the same routing as a Python API. Policies are
plain classes (:mod:`sagellm.engine.router.policies`) shared by both.
"""

from sagellm.engine.router.app import HTTPRouter, RouterConfig, build_router_app
from sagellm.engine.router.manager import ControlPlaneManager
from sagellm.engine.router.policies import (
    POLICIES,
    CacheAwarePolicy,
    LeastLoadPolicy,
    Policy,
    RoundRobinPolicy,
    RouteRequest,
    SLOPolicy,
    make_policy,
)
from sagellm.engine.router.pool import (
    NoHealthyWorkerError,
    RoutingError,
    UnknownModelError,
    WorkerPool,
)
from sagellm.engine.router.prefix_tree import PrefixTree
from sagellm.engine.router.serve import RouterThread, run_router
from sagellm.engine.router.workers import HealthPolicy, Worker

__all__ = [
    "POLICIES",
    "CacheAwarePolicy",
    "ControlPlaneManager",
    "HTTPRouter",
    "HealthPolicy",
    "LeastLoadPolicy",
    "NoHealthyWorkerError",
    "Policy",
    "PrefixTree",
    "RoundRobinPolicy",
    "RouteRequest",
    "RouterConfig",
    "RouterThread",
    "SLOPolicy",
    "RoutingError",
    "UnknownModelError",
    "Worker",
    "WorkerPool",
    "build_router_app",
    "make_policy",
    "run_router",
]

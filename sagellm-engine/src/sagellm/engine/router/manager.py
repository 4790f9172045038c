"""The control plane as a Python API: route between in-process engines and servers.

:class:`ControlPlaneManager` keeps the same workers and policies as ``sagellm router``
without the HTTP front: engines implementing :class:`sagellm.core.protocols.InferenceEngine`
are registered with their capabilities, servers by URL, and :meth:`route` names the
worker a request should go to. :meth:`generate` also runs the request on an in-process
engine, counting it as that engine's load while it runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from sagellm.core.protocols import InferenceEngine
from sagellm.core.types import RequestOutput, SamplingParams
from sagellm.engine.router.policies import DEVICE_HEADER, Policy, RouteRequest, make_policy
from sagellm.engine.router.pool import UnknownModelError, WorkerPool
from sagellm.engine.router.workers import HealthPolicy, Worker, parse_worker_spec, split_device

__all__ = ["ControlPlaneManager"]


class ControlPlaneManager:
    """Workers (engines and URLs) and one routing policy.

    ``policy``: a policy object or the name of one (``round_robin``, ``least_load``,
    ``cache_aware``; ``policy_options`` go to the cache-aware policy).
    """

    def __init__(
        self,
        policy: str | Policy = "cache_aware",
        *,
        health: HealthPolicy | None = None,
        **policy_options: Any,
    ) -> None:
        chosen = make_policy(policy, **policy_options) if isinstance(policy, str) else policy
        self.pool = WorkerPool(chosen)
        self.health = health or HealthPolicy()

    @property
    def policy(self) -> Policy:
        return self.pool.policy

    @property
    def workers(self) -> list[Worker]:
        return self.pool.workers

    def register_engine(
        self, name: str, engine: InferenceEngine, *, device: str | None = None
    ) -> Worker:
        """An in-process engine; its model and context come from ``capabilities()``.

        The model name is the engine's ``model_name`` when it has one (the name it
        serves under) and the capability descriptor's ``name`` otherwise; the context
        is the engine's ``max_model_len`` when it has one, else the descriptor's. The
        device kind is ``device``, else the descriptor's only device when it lists one.
        """
        caps = engine.capabilities()
        if device is None and len(caps.devices) == 1:
            device = caps.devices[0]
        model = getattr(engine, "model_name", None) or caps.name
        limit = getattr(engine, "max_model_len", None)
        if not isinstance(limit, int):
            limit = caps.max_model_len
        worker = Worker(
            name=name,
            engine=engine,
            models={str(model): limit},
            declared=True,
            health=self.health,
            healthy=engine.is_healthy(),
            device=device.lower() if device else None,
            device_declared=device is not None,
        )
        return self.pool.add(worker)

    def register_url(
        self,
        url: str,
        models: Sequence[str] | None = None,
        *,
        name: str | None = None,
        timeout: float = 5.0,
    ) -> Worker:
        """A server by URL (``URL@model`` and ``URL#device`` work too); models (and the
        device kind, if the server reports one) read from its ``/v1/models``.

        A server that cannot be reached is registered as down, with the models given.
        """
        import httpx

        spec, device = split_device(url)
        base, declared = parse_worker_spec(spec)
        declared = list(models or declared)
        worker = Worker(
            name=name or base,
            url=base,
            models=dict.fromkeys(declared),
            declared=bool(declared),
            health=self.health,
            device=device,
            device_declared=device is not None,
        )
        try:
            resp = httpx.get(base + "/v1/models", timeout=timeout, trust_env=False)
            resp.raise_for_status()
            cards = resp.json().get("data", [])
            found = {
                str(c["id"]): c.get("max_model_len")
                if isinstance(c.get("max_model_len"), int)
                else None
                for c in cards
                if isinstance(c, dict) and "id" in c
            }
            reported = [c["device"] for c in cards if isinstance(c, dict) and "device" in c]
            if worker.device is None and reported and isinstance(reported[0], str):
                worker.device = reported[0].lower()
            if worker.declared:
                for m in worker.models:
                    worker.models[m] = found.get(m)
            else:
                worker.models = found
        except (httpx.HTTPError, ValueError, AttributeError):
            worker.mark_down()
        return self.pool.add(worker)

    def remove(self, name: str) -> Worker:
        """Unregister a worker (its policy state goes too)."""
        return self.pool.remove(name)

    def _default_model(self) -> str:
        models = sorted(self.pool.models())
        if len(models) != 1:
            raise UnknownModelError(
                "name the model: this control plane serves "
                + (", ".join(models) if models else "no model")
            )
        return models[0]

    def route(
        self,
        model: str | None = None,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[dict[str, Any]] | None = None,
        *,
        exclude: Sequence[Worker] = (),
        device: str | None = None,
    ) -> Worker:
        """The worker for a request (raises a ``RoutingError`` when none can take it).

        ``model`` may be left out while only one model is served.
        """
        for w in self.pool.workers:
            if w.engine is not None:
                w.healthy = bool(w.engine.is_healthy())
        body: dict[str, Any] = {"model": model or self._default_model()}
        if messages is not None:
            body["messages"] = list(messages)
        elif prompt is not None:
            body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        headers = {DEVICE_HEADER: device} if device else None
        return self.pool.select(RouteRequest.from_body(body, headers), exclude=exclude)

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams,
        request_id: str,
        *,
        model: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Route to an in-process engine and stream its outputs."""
        worker = self.route(model, prompt)
        if worker.engine is None:
            raise ValueError(
                f"worker {worker.name} is a server ({worker.url}); send the request over HTTP"
            )
        worker.in_flight += 1
        try:
            async for out in worker.engine.generate(prompt, sampling, request_id):
                yield out
            worker.record_success()
        except Exception:
            worker.record_failure()
            raise
        finally:
            worker.in_flight -= 1

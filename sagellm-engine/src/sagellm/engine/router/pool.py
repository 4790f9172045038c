"""The set of workers and the choice of one for a request (shared by HTTP and in-process)."""

from __future__ import annotations

from collections.abc import Iterable

from sagellm.engine.router.policies import Policy, RouteRequest
from sagellm.engine.router.workers import Worker

__all__ = ["NoHealthyWorkerError", "RoutingError", "UnknownModelError", "WorkerPool"]


class RoutingError(Exception):
    """No worker can take the request."""

    status = 503
    code = "no_worker"


class UnknownModelError(RoutingError):
    """No registered worker serves the requested model."""

    status = 404
    code = "model_not_found"


class NoHealthyWorkerError(RoutingError):
    """Workers serve the model, but every one of them is down (or already failed)."""

    status = 503
    code = "no_healthy_worker"


class WorkerPool:
    """Workers in registration order and the policy that picks among them."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._workers: dict[str, Worker] = {}

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def __contains__(self, name: str) -> bool:
        return name in self._workers

    def get(self, name: str) -> Worker:
        return self._workers[name]

    def add(self, worker: Worker) -> Worker:
        if worker.name in self._workers:
            raise ValueError(f"a worker named {worker.name!r} is already registered")
        self._workers[worker.name] = worker
        return worker

    def remove(self, name: str) -> Worker:
        try:
            worker = self._workers.pop(name)
        except KeyError:
            raise KeyError(f"no worker named {name!r}") from None
        self.policy.forget(worker)
        return worker

    def models(self) -> dict[str, list[Worker]]:
        """Every served model with the workers serving it."""
        out: dict[str, list[Worker]] = {}
        for w in self._workers.values():
            for m in w.models:
                out.setdefault(m, []).append(w)
        return out

    def candidates(self, request: RouteRequest) -> list[Worker]:
        """Workers serving the model whose context fits a token-id prompt (may be empty)."""
        serving = [w for w in self._workers.values() if w.serves(request.model)]
        if request.device is not None:
            serving = [w for w in serving if w.device == request.device]
        n = request.num_prompt_tokens
        if n is None:
            return serving
        fits = [w for w in serving if (w.models[request.model] or n + 1) > n]
        return fits or serving  # none fits: let a worker explain the limit

    def select(self, request: RouteRequest, exclude: Iterable[Worker] = ()) -> Worker:
        """The policy's pick among the healthy candidates not in ``exclude``."""
        serving = self.candidates(request)
        if not serving and request.device is not None:
            model_workers = [w for w in self._workers.values() if w.serves(request.model)]
            if model_workers:
                kinds = sorted({w.device for w in model_workers if w.device is not None})
                unknown = sum(w.device is None for w in model_workers)
                where = ", ".join(kinds) if kinds else "no declared device"
                if unknown:
                    where += f" (and {unknown} worker(s) whose device kind is unknown)"
                raise UnknownModelError(
                    f"no worker serves model {request.model!r} on device {request.device!r}; "
                    f"it is served on: {where}"
                )
        if not serving:
            known = sorted(self.models())
            served = ", ".join(known) if known else "none (no worker has reported a model)"
            raise UnknownModelError(
                f"The model {request.model!r} does not exist on this router; "
                f"models served: {served}"
            )
        skip = {id(w) for w in exclude}
        healthy = [w for w in serving if w.healthy and id(w) not in skip]
        if not healthy:
            down = [w.name for w in serving if not w.healthy]
            if down:
                detail = f"{len(down)} of {len(serving)} down: {', '.join(down)}"
            else:
                detail = "every one failed this request"
            raise NoHealthyWorkerError(
                f"no healthy worker for model {request.model!r} "
                f"({len(serving)} registered, {detail}); try again later"
            )
        return self.policy.choose(request, healthy)

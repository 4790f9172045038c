"""The router's HTTP side: an OpenAI-compatible front that proxies to worker servers.

``POST /v1/completions`` and ``/v1/chat/completions`` go to one worker chosen by the
policy among the healthy workers serving the request's model, and come back unchanged
(server-sent events chunk by chunk, JSON whole). A prefill worker registered with a decode
partner (``--prefill URL --decode URL``: prefill/decode disaggregation) is chosen the same
way; the request then runs in two legs: the prefill worker computes the prompt with
``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true}``, and the decode
worker gets the original request plus the ``kv_transfer_params`` the prefill returned,
loads the prompt's KV instead of computing it, and answers the client (streaming or
not). A pair whose decode worker is down is not chosen. A worker that cannot be reached or
answers 5xx counts as a health failure and the request is tried once more on another
worker, as long as nothing has been sent to the client; a stream that breaks later ends
with an error event. Workers are checked with ``GET /health`` every ``health_interval``
seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from sagellm.engine._version import __version__
from sagellm.engine.router.policies import TTFT_HEADER, Policy, RouteRequest, make_policy
from sagellm.engine.router.pool import RoutingError, WorkerPool
from sagellm.engine.router.workers import HealthPolicy, Worker, parse_worker_spec, split_device

__all__ = ["HTTPRouter", "RouterConfig", "build_router_app", "error_body", "parse_load"]

logger = logging.getLogger(__name__)

#: Load gauges a worker's /metrics may expose (sageLLM and vLLM names).
LOAD_METRICS = (
    "sagellm_num_requests_running",
    "sagellm_num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)

_FORWARDED_HEADERS = ("authorization", "accept", "openai-organization", "openai-project")


@dataclass(frozen=True)
class RouterConfig:
    """Options of ``sagellm router``."""

    policy: str = "cache_aware"
    health_interval: float = 10.0  # seconds between two GET /health of a worker
    health_timeout: float = 5.0
    health_failures: int = 3  # consecutive failures that take a worker out
    health_successes: int = 2  # consecutive successes that bring it back
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_chars: int = 1 << 22  # per worker
    scrape_metrics: bool = False  # refresh loads from the workers' /metrics
    connect_timeout: float = 5.0
    request_timeout: float = 600.0  # longest silence while reading a worker's answer
    default_ttft_ms: float | None = None  # slo policy: objective of requests without one

    def make_policy(self) -> Policy:
        options: dict[str, Any] = {}
        if self.policy == "cache_aware":
            options = {
                "cache_threshold": self.cache_threshold,
                "balance_abs_threshold": self.balance_abs_threshold,
                "balance_rel_threshold": self.balance_rel_threshold,
                "max_tree_chars": self.max_tree_chars,
            }
        if self.policy == "slo":
            options = {"default_ttft_ms": self.default_ttft_ms}
        return make_policy(self.policy, **options)

    @property
    def health(self) -> HealthPolicy:
        return HealthPolicy(self.health_failures, self.health_successes)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """OpenAI's error schema."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, **kw: Any) -> JSONResponse:
    if status >= 500 and "type" not in kw:
        kw["type"] = "server_error"
    return JSONResponse(error_body(message, **kw), status_code=status)


def parse_load(text: str) -> int | None:
    """Running + waiting requests from a Prometheus text page (None: not exposed)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = len(line)
        for sep in ("{", " "):
            i = line.find(sep)
            if i != -1:
                name_end = min(name_end, i)
        if line[:name_end] not in LOAD_METRICS:
            continue
        rest = line[name_end:]
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1 :]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        total += value
        seen = True
    return int(round(total)) if seen else None


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = r = CollectorRegistry()
        self.routed = Counter(
            "sagellm_router_requests",
            "Requests sent to a worker, by the policy's decision",
            ["worker", "policy", "decision"],
            registry=r,
        )
        self.failures = Counter(
            "sagellm_router_worker_failures",
            "Failed requests and health checks of a worker",
            ["worker", "kind"],
            registry=r,
        )
        self.rejected = Counter(
            "sagellm_router_rejected_requests",
            "Requests no worker could take",
            ["reason"],
            registry=r,
        )
        self.up = Gauge(
            "sagellm_router_worker_up", "1 while a worker is in", ["worker"], registry=r
        )
        self.in_flight = Gauge(
            "sagellm_router_requests_in_flight",
            "Requests the router has open on a worker",
            ["worker"],
            registry=r,
        )
        self.load = Gauge(
            "sagellm_router_worker_load", "Load the policies see", ["worker"], registry=r
        )

    def render(self, workers: Sequence[Worker]) -> bytes:
        from prometheus_client import generate_latest

        for w in workers:
            self.up.labels(w.name).set(1 if w.healthy else 0)
            self.in_flight.labels(w.name).set(w.in_flight)
            self.load.labels(w.name).set(w.load)
        return generate_latest(self.registry)

    def forget(self, worker: Worker) -> None:
        for g in (self.up, self.in_flight, self.load):
            with contextlib.suppress(KeyError):
                g.remove(worker.name)


class _ProxyStream(StreamingResponse):
    """Streams a worker's events and runs ``on_close`` however the response ends."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class _Failed(Exception):
    """A worker failed a request before anything reached the client."""

    def __init__(
        self, detail: str, response: Response | None = None, worker: Worker | None = None
    ) -> None:
        super().__init__(detail)
        self.response = response
        self.worker = worker  # the one that failed, when not the one the request was sent to


class HTTPRouter:
    """Workers, policy, HTTP client and health checks of one ``sagellm router``."""

    def __init__(
        self,
        worker_specs: Sequence[str],
        config: RouterConfig | None = None,
        *,
        pd_pairs: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.config = config or RouterConfig()
        self.pool = WorkerPool(self.config.make_policy())
        self.metrics = _Metrics()
        self.client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task[None] | None = None
        for spec in worker_specs:
            self.add_url(spec)
        for prefill, decode in pd_pairs:
            self.add_pair(prefill, decode)

    @property
    def policy(self) -> Policy:
        return self.pool.policy

    def add_url(self, spec: str) -> Worker:
        spec, device = split_device(spec)
        url, models = parse_worker_spec(spec)
        worker = Worker(
            name=url,
            url=url,
            models=dict.fromkeys(models),
            declared=bool(models),
            health=self.config.health,
            device=device,
            device_declared=device is not None,
        )
        return self.pool.add(worker)

    def add_pair(self, prefill_spec: str, decode_spec: str) -> Worker:
        """Register a prefill worker (a ``kv_producer``) and its decode partner (the
        ``kv_consumer`` paired with it); only the prefill worker is routed to."""
        worker = self.add_url(prefill_spec)
        url, models = parse_worker_spec(split_device(decode_spec)[0])
        worker.decode = Worker(
            name=url,
            url=url,
            models=dict.fromkeys(models),
            declared=bool(models),
            health=self.config.health,
        )
        return worker

    def _all_workers(self) -> list[Worker]:
        """Every worker with a URL, decode partners included."""
        out = [w for w in self.pool.workers if w.url is not None]
        return out + [w.decode for w in out if w.decode is not None]

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the client, read every worker's models, start the health checks."""
        if self.client is None:
            c = self.config
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(c.request_timeout, connect=c.connect_timeout),
                limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256),
                trust_env=False,
            )
        await asyncio.gather(*(self.discover(w) for w in self._all_workers()))
        if self._health_task is None and self.config.health_interval > 0:
            self._health_task = asyncio.create_task(self._health_loop(), name="router-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._health_task
            self._health_task = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def discover(self, worker: Worker) -> bool:
        """Read ``/v1/models`` (models and context lengths); False when unreachable."""
        assert self.client is not None and worker.url is not None
        try:
            resp = await self.client.get(
                worker.url + "/v1/models", timeout=self.config.health_timeout
            )
            resp.raise_for_status()
            cards = [c for c in resp.json().get("data", []) if isinstance(c, dict) and "id" in c]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            logger.warning("worker %s: cannot read /v1/models (%s)", worker.name, exc)
            worker.mark_down()
            return False
        found: dict[str, int | None] = {}
        for card in cards:
            limit = card.get("max_model_len")
            found[str(card["id"])] = int(limit) if isinstance(limit, int) else None
            worker.model_cards[str(card["id"])] = card
            if not worker.device_declared and isinstance(card.get("device"), str):
                worker.device = card["device"].lower()
        if worker.declared:  # keep the operator's names; take the limits that match
            for m in worker.models:
                if m in found:
                    worker.models[m] = found[m]
                elif len(found) == 1:  # served under another name: its one limit
                    worker.models[m] = next(iter(found.values()))
        else:
            worker.models = found
        return True

    async def check(self, worker: Worker) -> None:
        """One health check (and a load scrape when enabled)."""
        assert self.client is not None and worker.url is not None
        try:
            resp = await self.client.get(worker.url + "/health", timeout=self.config.health_timeout)
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if not ok:
            self.metrics.failures.labels(worker.name, "health").inc()
            if worker.record_failure():
                logger.warning("worker %s is down (health checks failed)", worker.name)
            return
        if worker.record_success():
            logger.warning("worker %s is back", worker.name)
        if not worker.models:
            await self.discover(worker)
        if self.config.scrape_metrics:
            try:
                resp = await self.client.get(
                    worker.url + "/metrics", timeout=self.config.health_timeout
                )
                if resp.status_code == 200:
                    worker.set_reported_load(parse_load(resp.text))
            except httpx.HTTPError:
                pass

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            workers = self._all_workers()
            await asyncio.gather(*(self.check(w) for w in workers), return_exceptions=True)

    def remove(self, name: str) -> None:
        worker = self.pool.remove(name)
        self.metrics.forget(worker)

    # ------------------------------------------------------------------ routes

    def _failed(self, worker: Worker, detail: str) -> None:
        self.metrics.failures.labels(worker.name, "request").inc()
        if worker.record_failure():
            logger.warning("worker %s is down (%s)", worker.name, detail)

    async def proxy(self, request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _error(400, "model: a model name is required", param="model")
        try:
            route = RouteRequest.from_body(body, request.headers)
        except ValueError as exc:
            return _error(400, str(exc), param=TTFT_HEADER)
        stream = bool(body.get("stream"))
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED_HEADERS}
        headers.update((k, v) for k, v in request.headers.items() if k.startswith("x-"))
        headers["content-type"] = "application/json"
        tried: list[Worker] = []
        failure: _Failed | None = None
        # a pair whose decode partner is down cannot serve
        broken = [w for w in self.pool.workers if w.decode is not None and not w.decode.healthy]
        for attempt in range(2):
            try:
                worker = self.pool.select(route, exclude=tried + broken)
            except RoutingError as exc:
                self.metrics.rejected.labels(exc.code).inc()
                if failure is not None:
                    if failure.response is not None:
                        return failure.response
                    message = f"{tried[-1].name} failed ({failure}) and {exc}"
                    return _error(503, message, code=exc.code)
                param = "model" if exc.status == 404 else None
                return _error(exc.status, str(exc), param=param, code=exc.code)
            decision = "retry" if attempt else self.policy.last_decision
            self.metrics.routed.labels(worker.name, self.policy.name, decision).inc()
            tried.append(worker)
            try:
                if worker.decode is not None:
                    return await self._disaggregated(worker, path, body, headers, stream)
                return await self._forward(worker, path, raw, headers, stream)
            except _Failed as exc:
                failure = exc
                self._failed(exc.worker or worker, str(exc))
        assert failure is not None
        if failure.response is not None:
            return failure.response
        return _error(503, f"every worker tried failed; last: {failure}", code="worker_failed")

    async def _forward(
        self, worker: Worker, path: str, raw: bytes, headers: dict[str, str], stream: bool
    ) -> Response:
        assert self.client is not None and worker.url is not None
        open_before = worker.load
        sent = time.perf_counter()
        worker.in_flight += 1
        resp: httpx.Response | None = None
        handed_off = False  # the stream below now owns resp and the in-flight count
        try:
            req = self.client.build_request("POST", worker.url + path, content=raw, headers=headers)
            resp = await self.client.send(req, stream=True)
            if resp.status_code >= 500 or not stream or resp.status_code != 200:
                content = await resp.aread()
                answer = Response(
                    content,
                    status_code=resp.status_code,
                    media_type=resp.headers.get("content-type", "application/json"),
                )
                if resp.status_code >= 500:
                    raise _Failed(f"HTTP {resp.status_code}", answer)
                worker.record_success()
                return answer
            chunks = resp.aiter_raw()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            observe = getattr(self.policy, "observe", None)
            if observe is not None and first:
                observe(worker, time.perf_counter() - sent, open_before)
            handed_off = True
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise _Failed(detail) from exc
        finally:
            if not handed_off:
                worker.in_flight -= 1
                if resp is not None:
                    await resp.aclose()
        open_resp = resp
        assert open_resp is not None
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                worker.in_flight -= 1
                await open_resp.aclose()

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
                worker.record_success()
            except httpx.HTTPError as exc:
                self._failed(worker, f"stream broke: {exc}")
                err = error_body(
                    f"the worker {worker.name} failed while streaming ({type(exc).__name__})",
                    type="server_error",
                    code="worker_failed",
                )
                yield b"data: " + json.dumps(err).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                await close()

        return _ProxyStream(body(), close)

    async def _disaggregated(
        self,
        prefill: Worker,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        stream: bool,
    ) -> Response:
        """Prefill on ``prefill`` (one token, KV kept), then decode on its partner."""
        decode = prefill.decode
        assert decode is not None
        first = {k: v for k, v in body.items() if k != "stream_options"}
        first.update(max_tokens=1, stream=False, n=1, kv_transfer_params={"do_remote_decode": True})
        if "max_completion_tokens" in first:
            first["max_completion_tokens"] = 1
        answer = await self._forward(prefill, path, json.dumps(first).encode(), headers, False)
        if answer.status_code != 200:
            return answer  # the client's error (4xx), as the prefill worker put it
        try:
            params = json.loads(bytes(answer.body)).get("kv_transfer_params")
        except (ValueError, AttributeError):
            params = None
        if not isinstance(params, dict):
            raise _Failed(
                "its answer has no kv_transfer_params: start it with --kv-transfer-config "
                "and kv_role kv_producer",
                _error(
                    502,
                    f"the prefill worker {prefill.name} returned no kv_transfer_params; "
                    'start it with --kv-transfer-config \'{"kv_role": "kv_producer", ...}\'',
                    code="worker_failed",
                ),
            )
        second = dict(body)
        second["kv_transfer_params"] = params
        try:
            return await self._forward(decode, path, json.dumps(second).encode(), headers, stream)
        except _Failed as exc:
            raise _Failed(f"decode worker: {exc}", exc.response, worker=decode) from exc

    def models(self) -> dict[str, Any]:
        data = []
        for model, workers in self.pool.models().items():
            card: dict[str, Any] = {"id": model, "object": "model", "owned_by": "sagellm"}
            for w in workers:
                if model in w.model_cards:
                    card = {**card, **w.model_cards[model]}
                    break
            limits = [n for w in workers if (n := w.models[model]) is not None]
            card["max_model_len"] = max(limits) if limits else None
            card.pop("device", None)  # one worker's; the router serves the model on these:
            card["devices"] = sorted({w.device for w in workers if w.device is not None})
            card.setdefault("created", int(time.time()))
            data.append(card)
        return {"object": "list", "data": data}

    def health(self) -> Response:
        workers = self.pool.workers
        up = sum(w.healthy for w in workers)
        if up:
            return JSONResponse({"status": "ok", "workers_up": up, "workers": len(workers)})
        return _error(
            503,
            f"no worker is up ({len(workers)} registered)",
            code="no_healthy_worker",
        )

    def render_metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(self.pool.workers), media_type=CONTENT_TYPE_LATEST)


def build_router_app(router: HTTPRouter) -> FastAPI:
    """The FastAPI application of ``router`` (call ``router.start()`` before serving)."""
    app = FastAPI(title="sageLLM router", version=__version__, docs_url=None, redoc_url=None)
    app.state.router = router

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error", exc_info=exc)
        return _error(500, "the router had an error while processing the request")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await router.proxy(request, "/v1/completions")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await router.proxy(request, "/v1/chat/completions")

    @app.get("/v1/models", response_model=None)
    async def models() -> dict[str, Any]:
        return router.models()

    @app.get("/health", response_model=None)
    async def health() -> Response:
        return router.health()

    @app.get("/metrics", response_model=None)
    async def metrics() -> Response:
        return router.render_metrics()

    @app.get("/workers", response_model=None)
    async def workers() -> dict[str, Any]:
        return {
            "policy": router.policy.name,
            "workers": [w.describe() for w in router.pool.workers],
        }

    @app.get("/version", response_model=None)
    async def version() -> dict[str, str]:
        return {"version": __version__}

    return app

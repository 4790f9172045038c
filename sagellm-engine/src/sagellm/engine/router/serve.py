"""Running the router under uvicorn: in the foreground, or on a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

from sagellm.engine.router.app import HTTPRouter, build_router_app

__all__ = ["RouterThread", "bind_socket", "run_router"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), bound before uvicorn starts.

    The same as ``sagellm serve`` does, without importing the engine's server (torch).
    """
    from sagellm.core.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
            "(0 picks a free one)"
        ) from exc
    sock.listen(2048)
    return sock


def _uvicorn_server(app: Any, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=log_level in ("debug", "info"),
        timeout_keep_alive=30,
        lifespan="off",
    )
    return uvicorn.Server(config)


async def _serve(router: HTTPRouter, server: Any, sock: socket.socket) -> None:
    await router.start()
    try:
        await server.serve(sockets=[sock])
    finally:
        await router.close()


def run_router(
    router: HTTPRouter,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve ``router`` in the foreground until interrupted (Ctrl-C)."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(build_router_app(router), log_level)
    if on_ready is not None:
        bound_host, bound_port = sock.getsockname()[:2]
        on_ready(bound_host, bound_port)
    try:
        asyncio.run(_serve(router, server, sock))
    finally:
        sock.close()


class RouterThread:
    """Serves a router on a background thread (tests, benchmarks)::

    with RouterThread(HTTPRouter([url_a, url_b])) as r:
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="none")
    """

    def __init__(
        self, router: HTTPRouter, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self.router = router
        self._sock = bind_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = _uvicorn_server(build_router_app(router), log_level)
        self._server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._run, name="sagellm-router", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(_serve(self.router, self._server, self._sock))
        except BaseException as exc:  # surfaced by start()
            self.error = exc
        finally:
            loop.close()

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run ``fn()`` (a coroutine function) on the router's loop and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def start(self, timeout: float = 60.0) -> RouterThread:
        self._thread.start()
        stop = threading.Event()
        waited = 0.0
        while not self._server.started and waited < timeout:
            if not self._thread.is_alive():
                raise RuntimeError(f"the router thread stopped: {self.error!r}")
            stop.wait(0.02)
            waited += 0.02
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"the router did not start within {timeout} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> RouterThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Running the API under uvicorn, in the foreground or on a background thread.

The socket is bound here and handed to uvicorn, so a server asked for port 0 (any free
port) knows its real port before the first request, and no other process can take the
port between choosing and binding it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from sagellm.core.errors import ConfigError
from sagellm.engine.config import ServerConfig

__all__ = ["ServerThread", "bind_socket", "resolve_port", "run_server"]

logger = logging.getLogger(__name__)


def resolve_port(port: int | None) -> int:
    """``port`` itself, or :func:`sagellm.core.ports.get_port` when it is None."""
    if port is not None:
        return port
    from sagellm.core.ports import get_port

    return get_port("server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
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
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, config: ServerConfig) -> Any:
    import uvicorn

    uv_config = uvicorn.Config(
        app,
        log_level=config.log_level,
        access_log=config.log_level in ("debug", "info"),
        timeout_keep_alive=30,
        lifespan="off",
    )
    return uvicorn.Server(uv_config)


def run_server(app: Any, config: ServerConfig, *, on_ready: Any = None) -> None:
    """Serve ``app`` in the foreground until interrupted (Ctrl-C)."""
    sock = bind_socket(config.host, resolve_port(config.port))
    server = _uvicorn_server(app, config)
    host, port = sock.getsockname()[:2]
    if on_ready is not None:
        on_ready(host, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """Serves an app on a background thread (tests, benchmarks, notebooks).

    Usage::

        with ServerThread(build_app(engine), ServerConfig(port=0)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    """

    def __init__(self, app: Any, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig(port=0)
        self.app = app
        self._sock = bind_socket(self.config.host, resolve_port(self.config.port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = _uvicorn_server(app, self.config)
        self._server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._run, name="sagellm-server", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # surfaced by start()
            self.error = exc
        finally:
            engine = getattr(getattr(self.app.state, "server", None), "engine", None)
            if engine is not None:
                try:
                    loop.run_until_complete(engine.shutdown())
                except Exception:
                    logger.exception("engine shutdown failed")
            loop.close()

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Start serving; returns once uvicorn accepts connections."""
        self._thread.start()
        waited = 0.0
        while not self._server.started and waited < timeout:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server thread stopped: {self.error!r}")
            threading.Event().wait(0.02)
            waited += 0.02
        if not self._server.started:
            raise RuntimeError(f"the server did not start within {timeout} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving and join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

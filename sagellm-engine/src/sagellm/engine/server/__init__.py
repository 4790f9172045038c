"""OpenAI-compatible HTTP server of the engine.

Usage::

    from sagellm.engine.async_engine import AsyncLLMEngine
    from sagellm.engine.server import ServerConfig, ServerThread, build_app

    engine = AsyncLLMEngine.from_config()
    with ServerThread(build_app(engine), ServerConfig(port=0)) as srv:
        print(srv.url)  # point an OpenAI client at srv.url + "/v1"
"""

from sagellm.engine.config import ServerConfig
from sagellm.engine.server.app import APIError, build_app
from sagellm.engine.server.serve import ServerThread, run_server

__all__ = ["APIError", "ServerConfig", "ServerThread", "build_app", "run_server"]

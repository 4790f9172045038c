"""OpenAI-compatible HTTP server of the engine.

Usage::

    from sagellm.engine.async_engine import AsyncLLMEngine
    from sagellm.engine.server import APIKey, ServerConfig, ServerThread, build_app

    engine = AsyncLLMEngine.from_config()
    config = ServerConfig(port=0, api_keys=[APIKey(key="sk-a", tenant="acme")])
    with ServerThread(build_app(engine, config), config) as srv:
        print(srv.url)  # point an OpenAI client at srv.url + "/v1" with api_key="sk-a"
"""

from sagellm.engine.config import APIKey, ServerConfig, load_api_keys_file
from sagellm.engine.server.app import APIError, build_app
from sagellm.engine.server.serve import ServerThread, run_server

__all__ = [
    "APIError",
    "APIKey",
    "ServerConfig",
    "ServerThread",
    "build_app",
    "load_api_keys_file",
    "run_server",
]

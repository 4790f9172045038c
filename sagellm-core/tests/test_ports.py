from __future__ import annotations

import socket

import pytest

from sagellm.core.errors import ConfigError
from sagellm.core.ports import DEFAULT_PORTS, find_free_port, get_port, port_env_var


def test_default_server_port_is_8000() -> None:
    assert get_port(environ={}) == 8000
    assert get_port("server", environ={}) == DEFAULT_PORTS["server"] == 8000


def test_sagellm_port_sets_the_server_port() -> None:
    assert get_port(environ={"SAGELLM_PORT": "9100"}) == 9100
    assert get_port(environ={"SAGELLM_PORT": " 0 "}) == 0


def test_service_variable_wins_over_sagellm_port() -> None:
    env = {"SAGELLM_PORT": "9100", "SAGELLM_SERVER_PORT": "9200"}
    assert get_port(environ=env) == 9200
    assert port_env_var("server") == "SAGELLM_SERVER_PORT"


def test_other_services_ignore_sagellm_port() -> None:
    env = {"SAGELLM_PORT": "9100", "SAGELLM_METRICS_PORT": "9300"}
    assert get_port("metrics", environ=env) == 9300
    assert get_port("metrics", environ={"SAGELLM_PORT": "9100"}) == DEFAULT_PORTS["metrics"]


def test_empty_variable_falls_back() -> None:
    assert get_port(environ={"SAGELLM_SERVER_PORT": "", "SAGELLM_PORT": "9100"}) == 9100


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_PORT", "9400")
    monkeypatch.delenv("SAGELLM_SERVER_PORT", raising=False)
    assert get_port() == 9400


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http", "SAGELLM_PORT='http' is not a port number; use an integer in 0..65535"),
        (
            "70000",
            "SAGELLM_PORT=70000 is out of range; use an integer in 0..65535 (0: any free port)",
        ),
        ("-1", "SAGELLM_PORT=-1 is out of range; use an integer in 0..65535 (0: any free port)"),
    ],
)
def test_invalid_values(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        get_port(environ={"SAGELLM_PORT": value})
    assert str(info.value) == message


def test_unknown_service() -> None:
    with pytest.raises(ConfigError) as info:
        get_port("grpc", environ={})
    assert str(info.value) == (
        f"unknown service 'grpc'; known services: {', '.join(DEFAULT_PORTS)}"
    )
    with pytest.raises(ConfigError, match="must be lower-case"):
        get_port("Server", environ={})


def test_find_free_port_can_be_bound() -> None:
    port = find_free_port()
    assert 0 < port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))

"""The OpenAPI schema describes every route, and schema-driven fuzzing finds no 5xx."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from sagellm.engine.async_engine import AsyncLLMEngine
from sagellm.engine.config import ServerConfig
from sagellm.engine.server import build_app

from .conftest import make_llm


@pytest.fixture(scope="module")
def app(tiny_model):
    llm = make_llm(tiny_model, num_blocks=256, max_model_len=48, max_num_batched_tokens=256)
    return build_app(AsyncLLMEngine(llm.engine), ServerConfig(max_request_body_bytes=1 << 16))


def test_every_operation_has_its_bodies(app) -> None:
    spec = app.openapi()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"] and "400" in op["responses"], (path, method)
            ok = op["responses"]["200"]["content"]
            if path != "/metrics":
                assert "$ref" in ok["application/json"]["schema"], (path, method)
            if method == "post":
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.split("/")[-1] in spec["components"]["schemas"]
    posts = {p for p, ops in spec["paths"].items() if "post" in ops}
    assert posts == {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/tokenize",
        "/detokenize",
    }


def test_fuzzing_finds_no_server_error(app) -> None:
    """A few schema-generated requests per operation (positive and negative) get no 5xx."""
    api_schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    model = app.state.server.model_name
    names = []
    statuses: Counter[tuple[str, int]] = Counter()
    for result in api_schema.get_all_operations():
        operation = result.ok()
        names.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(
            max_examples=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model  # past the 404 of an unknown model, into the engine
            response = case.call()
            statuses[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=[not_a_server_error])

        run()
    assert len(names) == 10
    # the bodies got past validation into the engine, not only into 4xx answers
    assert sum(
        n for (label, code), n in statuses.items() if label.startswith("POST /v1/") and code == 200
    )

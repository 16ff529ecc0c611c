"""schemathesis against the app's own OpenAPI schema, on every operation: no 5xx, statuses, content
types and bodies as documented, and every schema-breaking request refused (a real server; a tiny
random-init model so generation is quick)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from server.config import ExpertConfig, Settings
from tests.conftest import LiveServer, tiny_experts

# no 5xx, every status and content type as documented, bodies matching their schemas, and every
# request that breaks the schema refused
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_server(model_path: Path) -> Iterator[LiveServer]:
    # room for n = 16 (4 running + 64 waiting), so a valid request is never refused as overload
    expert = ExpertConfig(name="tiny", max_batch_size=4, max_model_len=128, max_waiting_requests=64)
    live = LiveServer(Settings(experts=[expert]), expert_factory=tiny_experts(model_path, slots=4))
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api_schema(api_server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_every_operation_answers_as_its_schema_says(api_schema: Any, mode: GenerationMode) -> None:
    """Positive (schema-valid) and negative (schema-violating) requests to every operation; a
    generated valid body names the served model, so it reaches the engine (a made-up name would
    stop at the 404)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    statuses: set[int] = set()
    for operation in operations:

        @given(operation.as_strategy(mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            named = isinstance(case.body, dict) and isinstance(case.body.get("model"), str)
            if named and mode is GenerationMode.POSITIVE:  # a negative case's model may be what it breaks
                case.body["model"] = "tiny"
            statuses.add(case.call_and_validate(checks=CHECKS, timeout=60).status_code)

        try:
            check()
        except Unsatisfiable:  # an operation without parameters has nothing to violate
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    # valid requests were served (and some refused); schema-breaking ones refused
    assert {200, 400} <= statuses if mode is GenerationMode.POSITIVE else 400 in statuses

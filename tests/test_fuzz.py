"""Fuzz every operation of the published OpenAPI document against a real gateway process.

Positive and negative cases (schemathesis), sent as nobody, as a client and as the admin:
whatever arrives, the answer is never a 5xx, and every error is the JSON error shape.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import schemathesis
from conftest import ServiceProcess
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES_PER_MODE = 25


def _client_key(service: ServiceProcess, admin: dict[str, str]) -> dict[str, str]:
    body = json.dumps({"api_name": "fuzz-client", "return_api": "http://127.0.0.1:9/fuzz"})
    request = urllib.request.Request(
        service.url + "/server/api/create",
        data=body.encode(),
        method="POST",
        headers={**admin, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return {"Authorization": "Bearer " + json.load(resp)["api_key"]}


def _operations(service: ServiceProcess) -> list[Any]:
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_openapi_document_covers_the_routes(gateway_process: ServiceProcess) -> None:
    labels = {op.label for op in _operations(gateway_process)}
    assert "POST /server/api/create" in labels
    assert "GET /readyz" in labels


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_never_5xx(
    gateway_process: ServiceProcess, admin: dict[str, str], mode: GenerationMode
) -> None:
    client = _client_key(gateway_process, admin) if mode is GenerationMode.POSITIVE else {}
    identities = [{}, admin, client] if client else [{}, admin]
    failures: list[str] = []
    sent: list[int] = []
    for operation in _operations(gateway_process):
        if operation.path == "/email-status":
            continue  # SNS endpoint: exercised with signed messages in its own tests
        _fuzz_operation(gateway_process.url, operation, mode, identities, failures, sent)
    assert not failures, "\n".join(failures[:20])
    assert len(sent) > 100  # the fuzzer really exercised the API


def _fuzz_operation(
    url: str,
    operation: Any,
    mode: GenerationMode,
    identities: list[dict[str, str]],
    failures: list[str],
    sent: list[int],
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        for headers in identities:
            response = case.call(base_url=url, headers=headers, timeout=30)
            sent.append(response.status_code)
            where = f"{operation.label} [{mode}] -> {response.status_code}"
            if response.status_code >= 500:
                failures.append(f"{where}: {response.text[:200]}")
            elif response.status_code >= 400 and "json" in response.headers.get("Content-Type", ""):
                body = response.json()
                if body.get("valid") is not False or "msg" not in body or "code" not in body:
                    failures.append(f"{where}: error body not in the contract shape: {body}")

    try:
        run()
    except Unsatisfiable:
        # Nothing can be made invalid for an operation without parameters or body (GET /healthz).
        assert mode is GenerationMode.NEGATIVE

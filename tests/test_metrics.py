"""/metrics exposes the engine metrics DESIGN.md names, with millisecond buckets, counting every request."""

from __future__ import annotations

import re

import httpx

from tests.conftest import MODEL

NAMES = [
    "turnout:time_to_first_token_seconds_bucket",
    "turnout:inter_token_latency_seconds_bucket",
    "turnout:e2e_request_latency_seconds_bucket",
    "turnout:request_queue_time_seconds_bucket",
    "turnout:num_requests_running",
    "turnout:num_requests_waiting",
    "turnout:kv_cache_usage_perc",
    "turnout:prompt_tokens_total",
    "turnout:generation_tokens_total",
    "turnout:request_success_total",
    "turnout:request_cost_usd_total",
]


def _value(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _scrape(server) -> str:  # type: ignore[no-untyped-def]
    return httpx.get(f"{server.url}/metrics", timeout=10).text


async def test_metrics_count_requests_without_usage_requested(client, server) -> None:
    label = f'model_name="{MODEL}"'
    before = _scrape(server)
    stream = await client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    async for _ in stream:  # the client never asks for usage
        pass
    after = _scrape(server)
    for name in NAMES:
        assert name in after, name
    gen = _value(after, "turnout:generation_tokens_total", label) - _value(
        before, "turnout:generation_tokens_total", label
    )
    prompt = _value(after, "turnout:prompt_tokens_total", label) - _value(before, "turnout:prompt_tokens_total", label)
    assert gen == 6 and prompt == 1
    ok = f'finished_reason="length",{label}'
    assert _value(after, "turnout:request_success_total", ok) == _value(before, "turnout:request_success_total", ok) + 1
    assert _value(after, "turnout:request_cost_usd_total", label) > _value(
        before, "turnout:request_cost_usd_total", label
    )


def test_histograms_resolve_milliseconds(server) -> None:
    text = _scrape(server)
    buckets = re.findall(r'turnout:inter_token_latency_seconds_bucket\{le="([0-9.]+)"', text)
    assert "0.001" in buckets and "0.005" in buckets and "0.01" in buckets


def test_errors_are_counted_by_model_and_status(server) -> None:
    """A refused request counts under its model (or "unknown" for a name no expert has, or a body
    that did not parse)."""
    errors = "turnout:request_errors_total"
    bad_field = f'model_name="{MODEL}",status="400"'
    no_model = 'model_name="unknown",status="404"'
    before = _scrape(server)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}  # past the context: refused after parsing
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=10).status_code == 400
    body = {"model": "no-such-model", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=10).status_code == 404
    after = _scrape(server)
    assert _value(after, errors, bad_field) == _value(before, errors, bad_field) + 1
    assert _value(after, errors, no_model) == _value(before, errors, no_model) + 1

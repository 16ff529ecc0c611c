"""Writes turnout's Grafana dashboard: deploy/grafana/dashboards/turnout.json (compose) and
deploy/k8s/base/grafana-dashboard.json (the Kubernetes ConfigMap; kustomize reads only files
under its own folder).

    python deploy/grafana/dashboard.py

Every query is evaluated against a real Prometheus scraping a real turnout in
tests/test_observability.py, so a panel that nothing feeds fails the test suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "turnout.json"
OUTPUTS = (OUT, HERE.parent / "k8s" / "base" / "grafana-dashboard.json")
SEL = '{model_name=~"$expert"}'
RATE = "$__rate_interval"
LARGE = '{model_name=~"$expert", source="large"}'


def rate(metric: str, by: str = "model_name", selector: str = SEL) -> str:
    return f"sum by ({by}) (rate({metric}{selector}[{RATE}]))"


def quantiles(histogram: str) -> list[tuple[str, str]]:
    """p50/p90/p99 from the rate of the buckets (what happened lately, not since start)."""
    return [
        (f"p{q} {{{{model_name}}}}", f"histogram_quantile(0.{q}, {rate(histogram + '_bucket', 'le, model_name')})")
        for q in ("50", "90", "99")
    ]


# (title, unit, [(legend, expr)]), laid out two per row
TIMESERIES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests / s by expert", "reqps", [("{{model_name}}", rate("turnout:request_success_total"))]),
    (
        "Errors / s by model and status",
        "reqps",
        [("{{model_name}} {{status}}", rate("turnout:request_errors_total", "model_name, status", ""))],
    ),
    ("Time to first token", "s", quantiles("turnout:time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("turnout:inter_token_latency_seconds")),
    ("End-to-end latency", "s", quantiles("turnout:e2e_request_latency_seconds")),
    (
        "Tokens / s",
        "short",
        [
            ("generated {{model_name}}", rate("turnout:generation_tokens_total")),
            ("prompt {{model_name}}", rate("turnout:prompt_tokens_total")),
        ],
    ),
    (
        "Requests running / waiting",
        "short",
        [
            ("running {{model_name}}", f"turnout:num_requests_running{SEL}"),
            ("waiting {{model_name}}", f"turnout:num_requests_waiting{SEL}"),
        ],
    ),
    (
        "Admission queue",
        "short",
        [
            ("admitted sequences {{model_name}}", f"turnout:admitted_sequences{SEL}"),
            ("queued prompt tokens {{model_name}}", f"turnout:queued_prompt_tokens{SEL}"),
        ],
    ),
    (
        "Refused (queue full) and aborted (deadline, disconnect) / s",
        "reqps",
        [
            ("refused {{model_name}} {{reason}}", rate("turnout:requests_rejected_total", "model_name, reason")),
            ("aborted {{model_name}} {{reason}}", rate("turnout:requests_aborted_total", "model_name, reason")),
        ],
    ),
    (
        "KV cache use, H2O evictions and preemptions",
        "short",
        [
            ("use (0-1) {{model_name}}", f"turnout:kv_cache_usage_perc{SEL}"),
            ("evicted tokens/s {{model_name}}", rate("turnout:kv_evicted_tokens_total")),
            ("preemptions/s {{model_name}}", rate("turnout:num_preemptions_total")),
        ],
    ),
    (
        "Speculative decoding",
        "short",
        [
            (
                "acceptance rate {{model_name}}",
                f"{rate('turnout:spec_decode_num_accepted_tokens_total')} / "
                f"{rate('turnout:spec_decode_num_draft_tokens_total')}",
            ),
            (
                "mean accepted length {{model_name}}",
                f"1 + {rate('turnout:spec_decode_num_accepted_tokens_total')} / "
                f"{rate('turnout:spec_decode_num_drafts_total')}",
            ),
        ],
    ),
    (
        "CoE decisions / s (model auto)",
        "reqps",
        [("{{category}} -> {{expert}}", rate("turnout:route_decisions_total", "category, expert", ""))],
    ),
    (
        "R2R large-model token fraction",
        "percentunit",
        [
            (
                "{{model_name}}",
                f"{rate('turnout:r2r_tokens_total', 'model_name', LARGE)} / {rate('turnout:r2r_tokens_total')}",
            )
        ],
    ),
    (
        "CoE routing latency",
        "s",
        [
            (f"p{q}", f"histogram_quantile(0.{q}, {rate('turnout:route_latency_seconds_bucket', 'le', '')})")
            for q in ("50", "99")
        ],
    ),
    ("Cost, USD per hour", "currencyUSD", [("{{model_name}}", f"3600 * {rate('turnout:request_cost_usd_total')}")]),
    (
        "Cost, USD per 1k tokens",
        "currencyUSD",
        [
            (
                "{{model_name}}",
                f"1000 * {rate('turnout:request_cost_usd_total')} / "
                f"({rate('turnout:prompt_tokens_total')} + {rate('turnout:generation_tokens_total')})",
            )
        ],
    ),
    (
        "Requests / s by API key and status",
        "reqps",
        [("{{key_name}} {{status}}", rate("turnout:api_key_requests_total", "key_name, status", ""))],
    ),
    (
        "Tokens / s by API key",
        "short",
        [("{{key_name}} {{kind}}", rate("turnout:api_key_tokens_total", "key_name, kind", ""))],
    ),
    (
        "Cost by API key, USD per hour",
        "currencyUSD",
        [("{{key_name}}", f"3600 * {rate('turnout:api_key_cost_usd_total', 'key_name', '')}")],
    ),
    ("API key spend this budget period", "currencyUSD", [("{{key_name}}", "turnout:api_key_spend_usd")]),
]

# instant tables: what each expert runs
TABLES: list[tuple[str, str]] = [
    ("Experts: quantization, KV policy, draft", f"turnout:engine_config_info{SEL}"),
    (
        "KV budget (tokens per sequence), slots and pool tokens",
        f"turnout:kv_cache_budget_tokens{SEL} or turnout:kv_cache_slots{SEL} or turnout:kv_cache_pool_tokens{SEL}",
    ),
]


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, (title, query) in enumerate(TABLES):
        out.append(
            {
                "type": "table",
                "title": title,
                "gridPos": {"x": 12 * i, "y": 0, "w": 12, "h": 6},
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "targets": [{"refId": "A", "expr": query, "instant": True, "format": "table"}],
            }
        )
    for i, (title, unit, queries) in enumerate(TIMESERIES):
        out.append(
            {
                "type": "timeseries",
                "title": title,
                "gridPos": {"x": 12 * (i % 2), "y": 6 + 8 * (i // 2), "w": 12, "h": 8},
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (legend, expr) in enumerate(queries)
                ],
            }
        )
    for i, panel in enumerate(out):
        panel["id"] = i + 1
    return out


def dashboard() -> dict[str, Any]:
    expert = {
        "name": "expert",
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "query": "label_values(turnout:num_requests_running, model_name)",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }
    return {
        "uid": "turnout",
        "title": "turnout",
        "tags": ["turnout", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [expert]},
        "panels": panels(),
    }


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query in a dashboard."""
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


if __name__ == "__main__":
    for out in OUTPUTS:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dashboard(), indent=2) + "\n")
        print(f"wrote {out} ({len(queries(dashboard()))} queries)")

"""Prometheus metrics: vLLM's names under ``turnout:``, recorded from plain engine stats."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.base import EngineStats, ModelInfo, RequestStats
from server.admission import AdmissionQueue

# Millisecond resolution at the low end: a small model answers in milliseconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LABEL = ["model_name"]
KEY_LABEL = ["key_name"]  # names from the keys file only (never key text): a bounded set


class EngineStatsCollector(Collector):
    """Reads each expert's live gauges at scrape time, so the engine never touches Prometheus."""

    def __init__(
        self, sources: Callable[[], dict[str, EngineStats]], infos: Callable[[], dict[str, ModelInfo]]
    ) -> None:
        self._sources, self._infos = sources, infos

    def collect(self) -> Iterable[Metric]:
        yield from self._config()
        yield from self._live()

    def _config(self) -> Iterable[Metric]:
        """What each expert runs (quantization, KV policy, draft), so dashboards can compare them."""
        config = InfoMetricFamily(
            "turnout:engine_config", "Engine configuration", labels=[*LABEL, "quantization", "kv_policy", "draft"]
        )
        weights = GaugeMetricFamily("turnout:engine_weight_bytes", "Bytes of model weights held", labels=LABEL)
        budget = GaugeMetricFamily(
            "turnout:kv_cache_budget_tokens",
            "KV entries a sequence may hold (H2O budget)",
            labels=LABEL,
        )
        slots = GaugeMetricFamily("turnout:kv_cache_slots", "Sequences the KV pool holds at once", labels=LABEL)
        tokens = GaugeMetricFamily("turnout:kv_cache_pool_tokens", "Tokens the paged KV pool holds", labels=LABEL)
        for name, info in self._infos().items():
            if (pool := info.kv_pool) is not None:
                budget.add_metric([name], float(pool.slot_tokens))
                slots.add_metric([name], float(pool.slots))
                if pool.pages is not None:
                    tokens.add_metric([name], float(pool.pages["tokens"]))  # type: ignore[arg-type]
            kv_policy = pool.policy if pool is not None else "full"
            config.add_metric([name, info.quantization or "none", kv_policy, info.draft or "none"], {})
            if info.weight_bytes is not None:
                weights.add_metric([name], float(info.weight_bytes))
        return [config, weights, budget, slots, tokens]

    def _live(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("turnout:num_requests_running", "Requests in the decode batch", labels=LABEL)
        waiting = GaugeMetricFamily("turnout:num_requests_waiting", "Requests waiting for a slot", labels=LABEL)
        kv = GaugeMetricFamily(
            "turnout:kv_cache_usage_perc", "Tokens held over the KV pool's capacity (0-1)", labels=LABEL
        )
        preempted = CounterMetricFamily(
            "turnout:num_preemptions", "Sequences preempted for want of KV pages (recomputed later)", labels=LABEL
        )
        evicted = CounterMetricFamily(
            "turnout:kv_evicted_tokens", "Tokens evicted from sequences' KV caches (H2O)", labels=LABEL
        )
        for name, stats in self._sources().items():
            running.add_metric([name], stats.num_running)
            waiting.add_metric([name], stats.num_waiting)
            kv.add_metric([name], stats.kv_cache_usage)
            evicted.add_metric([name], stats.kv_evicted_tokens)
            preempted.add_metric([name], stats.num_preemptions)
        return [running, waiting, kv, evicted, preempted]


class AdmissionCollector(Collector):
    """Each expert's admission queue at scrape time: sequences admitted, prompt tokens waiting."""

    def __init__(self, queues: Callable[[], dict[str, AdmissionQueue]]) -> None:
        self._queues = queues

    def collect(self) -> Iterable[Metric]:
        admitted = GaugeMetricFamily(
            "turnout:admitted_sequences", "Sequences admitted and not finished (running or waiting)", labels=LABEL
        )
        queued = GaugeMetricFamily(
            "turnout:queued_prompt_tokens", "Prompt tokens of admitted sequences not yet started", labels=LABEL
        )
        for name, queue in self._queues().items():
            admitted.add_metric([name], queue.outstanding)
            queued.add_metric([name], queue.queued_tokens)
        return [admitted, queued]


class KeySpendCollector(Collector):
    """Each API key's spend in its current budget period, read at scrape time (a period that
    rolls over reads 0 without anyone resetting a gauge)."""

    def __init__(self, spend: Callable[[], dict[str, float]]) -> None:
        self._spend = spend

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "turnout:api_key_spend_usd", "USD an API key spent in its current budget period", labels=KEY_LABEL
        )
        for name, usd in self._spend().items():
            gauge.add_metric([name], usd)
        yield gauge


class Metrics:
    def __init__(
        self,
        engine_stats: Callable[[], dict[str, EngineStats]],
        engine_infos: Callable[[], dict[str, ModelInfo]],
        queues: Callable[[], dict[str, AdmissionQueue]] = dict,
        key_spend: Callable[[], dict[str, float]] = lambda: {},
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "turnout:time_to_first_token_seconds", "Time to first token", LABEL, buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "turnout:inter_token_latency_seconds", "Time between tokens", LABEL, buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "turnout:e2e_request_latency_seconds", "Arrival to last token", LABEL, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "turnout:request_queue_time_seconds",
            "Arrival to first scheduling",
            LABEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("turnout:prompt_tokens_total", "Prompt tokens", LABEL, registry=r)
        self.generation_tokens = Counter("turnout:generation_tokens_total", "Generated tokens", LABEL, registry=r)
        self.success = Counter(
            "turnout:request_success_total", "Finished requests", [*LABEL, "finished_reason"], registry=r
        )
        self.request_errors = Counter(
            "turnout:request_errors_total",
            "Requests answered with an error, by the model asked for and HTTP status",
            [*LABEL, "status"],
            registry=r,
        )
        self.cost = Counter("turnout:request_cost_usd_total", "Cost of served requests in USD", LABEL, registry=r)
        self.spec_drafts = Counter(
            "turnout:spec_decode_num_drafts_total", "Verification passes that checked drafts", LABEL, registry=r
        )
        self.spec_draft_tokens = Counter(
            "turnout:spec_decode_num_draft_tokens_total", "Draft tokens proposed", LABEL, registry=r
        )
        self.spec_accepted = Counter(
            "turnout:spec_decode_num_accepted_tokens_total", "Draft tokens accepted", LABEL, registry=r
        )
        self.spec_accepted_per_pos = Counter(
            "turnout:spec_decode_num_accepted_tokens_per_pos_total",
            "Draft tokens accepted at each draft position (0 = first)",
            [*LABEL, "position"],
            registry=r,
        )
        self.r2r_tokens = Counter(
            "turnout:r2r_tokens_total",
            "Tokens of r2r experts by who wrote them (the small model, or the large one after a flag)",
            [*LABEL, "source"],
            registry=r,
        )
        self.route_decisions = Counter(
            "turnout:route_decisions_total",
            "CoE routing decisions (model auto) by category and chosen expert",
            ["category", "expert", "reason"],
            registry=r,
        )
        self.route_latency = Histogram(
            "turnout:route_latency_seconds", "Time the CoE router takes to decide", buckets=LATENCY_BUCKETS, registry=r
        )
        self.rejected = Counter(
            "turnout:requests_rejected_total",
            "Requests refused with 503 before any byte because the expert's wait queue was full",
            [*LABEL, "reason"],
            registry=r,
        )
        self.aborted = Counter(
            "turnout:requests_aborted_total",
            "Requests whose engine work was stopped: past their deadline, or the client went away",
            [*LABEL, "reason"],
            registry=r,
        )
        self.failovers = Counter(
            "turnout:route_failovers_total",
            "Routed requests moved to the fallback after their expert failed before the first token",
            ["from_expert", "to_expert"],
            registry=r,
        )
        self.key_requests = Counter(
            "turnout:api_key_requests_total",
            "/v1 requests by API key name and HTTP status",
            [*KEY_LABEL, "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "turnout:api_key_tokens_total", "Tokens charged to API keys", [*KEY_LABEL, "kind"], registry=r
        )
        self.key_cost = Counter("turnout:api_key_cost_usd_total", "USD charged to API keys", KEY_LABEL, registry=r)
        r.register(EngineStatsCollector(engine_stats, engine_infos))
        r.register(AdmissionCollector(queues))
        r.register(KeySpendCollector(key_spend))

    def record(self, expert: str, stats: RequestStats, finish_reason: str, cost_usd: float) -> None:
        """One engine request (one choice) finished; prompt tokens count once per request."""
        self.ttft.labels(expert).observe(stats.ttft_s)
        self.e2e.labels(expert).observe(stats.e2e_s)
        self.queue.labels(expert).observe(stats.queue_s)
        for gap in stats.inter_token_latencies():
            self.itl.labels(expert).observe(gap)
        self.generation_tokens.labels(expert).inc(stats.completion_tokens)
        self.success.labels(expert, finish_reason).inc()
        self.cost.labels(expert).inc(cost_usd)
        if stats.r2r.threshold is not None:
            self.r2r_tokens.labels(expert, "small").inc(stats.r2r.small_tokens)
            self.r2r_tokens.labels(expert, "large").inc(stats.r2r.large_tokens)
        spec = stats.speculation
        if spec.steps:
            self.spec_drafts.labels(expert).inc(spec.steps)
            self.spec_draft_tokens.labels(expert).inc(spec.draft_tokens)
            self.spec_accepted.labels(expert).inc(spec.accepted_tokens)
            for position, accepted in enumerate(spec.accepted_per_position):
                self.spec_accepted_per_pos.labels(expert, str(position)).inc(accepted)

    def record_prompt(self, expert: str, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(expert).inc(prompt_tokens)

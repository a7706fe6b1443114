"""Prometheus metrics of the API server, on a registry of its own (several apps can live in one process).

Contract: names are prefixed `mtlora:`. Counters and histograms are fed by the request path (`RequestMetrics`);
gauges (running/waiting requests, KV usage, per-adapter expert routing) are read from `engine.stats()` at scrape
time by a custom collector, so they are never stale. The base model's label value is its served name.

    mtlora:requests_total{adapter,finish_reason}      one per finished sequence (choice) of an admitted request
    mtlora:requests_rejected_total{adapter,reason}    requests refused at admission; reason "queue_full" (the 429s)
    mtlora:request_errors_total{code}                 error responses by HTTP status
    mtlora:prompt_tokens_total{adapter}               prompt tokens of accepted requests
    mtlora:generation_tokens_total{adapter}           generated tokens
    mtlora:time_to_first_token_seconds{adapter}       histogram: arrival -> first generated token
    mtlora:inter_token_latency_seconds{adapter}       histogram: gap between successive token outputs
    mtlora:e2e_request_latency_seconds{adapter}       histogram: arrival -> last output, per engine request that
                                                      finished (stop, length, or aborted by the engine at shutdown)
    mtlora:request_queue_time_seconds{adapter}        histogram: arrival -> first scheduled by the engine
    mtlora:num_requests_running / _waiting            gauges (engine)
    mtlora:kv_cache_usage_ratio, mtlora:kv_blocks_used, mtlora:kv_blocks_total
    mtlora:prefix_cache_queries_total / _hits_total   tokens looked up in / found in the prefix cache (engine)
    mtlora:adapter_expert_routing_weight{adapter,expert}   mean routing weight of each expert
    mtlora:adapter_routing_entropy_nats{adapter}           mean routing entropy
    mtlora:adapters_loaded                            served adapters (engine.list_adapters())
    mtlora:adapters_registered / _resident            registered adapters / those in device slots (engine)
    mtlora:adapter_loads_total                        non-resident adapters brought into a slot
    mtlora:adapter_disk_loads_total / _load_failures_total   adapter reads from disk (file + validation) / failed
    mtlora:adapter_evictions_total                    resident adapters evicted to make room
    mtlora:adapter_host_cache_hits_total / _bytes     slot loads served from the host-memory cache / its size
    mtlora:adapter_wait_seconds                       histogram: time a request waited for its adapter to load
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from mtlora_server.engine.types import AdapterCounters

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector:
    """Reads engine.stats() on every scrape."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []        # no up-front description: names depend on what stats() reports

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # a broken engine must not break /metrics itself
            logger.exception("engine.stats() failed")
            return
        yield GaugeMetricFamily("mtlora:num_requests_running", "Requests being decoded.", value=stats.num_running)
        yield GaugeMetricFamily("mtlora:num_requests_waiting", "Requests queued for admission.",
                                value=stats.num_waiting)
        yield GaugeMetricFamily("mtlora:kv_cache_usage_ratio", "Fraction of KV blocks in use.", value=stats.kv_usage)
        yield GaugeMetricFamily("mtlora:kv_blocks_used", "KV cache blocks in use.", value=stats.kv_blocks_used)
        yield GaugeMetricFamily("mtlora:kv_blocks_total", "KV cache blocks in the pool.", value=stats.kv_blocks_total)
        yield CounterMetricFamily("mtlora:prefix_cache_queries", "Tokens looked up in the prefix cache at admission.",
                                  value=getattr(stats, "prefix_cache_queries_total", 0))
        yield CounterMetricFamily("mtlora:prefix_cache_hits", "Looked-up tokens whose K/V came from the prefix cache.",
                                  value=getattr(stats, "prefix_cache_hits_total", 0))
        weight = GaugeMetricFamily("mtlora:adapter_expert_routing_weight",
                                   "Mean routing weight of each expert of an adapter.", labels=["adapter", "expert"])
        for adapter, usage in sorted(stats.expert_usage.items()):
            for expert, value in enumerate(usage):
                weight.add_metric([adapter, str(expert)], float(value))
        yield weight
        entropy = GaugeMetricFamily("mtlora:adapter_routing_entropy_nats",
                                    "Mean routing entropy of an adapter (nats).", labels=["adapter"])
        for adapter, value in sorted(stats.routing_entropy.items()):
            entropy.add_metric([adapter], float(value))
        yield entropy
        yield from _adapter_residency(stats)
        try:
            yield GaugeMetricFamily("mtlora:adapters_loaded", "Adapters served.",
                                    value=len(self.engine.list_adapters()))
        except Exception:
            logger.exception("engine.list_adapters() failed")


def _adapter_residency(stats):
    """Registered / resident adapters, loads, evictions, host-cache hits, adapter waits (adapter_registry)."""
    yield GaugeMetricFamily("mtlora:adapters_registered", "Adapters registered (servable, resident or not).",
                            value=getattr(stats, "adapters_registered", 0))
    yield GaugeMetricFamily("mtlora:adapters_resident", "Adapters resident in device slots.",
                            value=getattr(stats, "adapters_resident", 0))
    yield GaugeMetricFamily("mtlora:adapter_host_cache_bytes", "Validated adapter tensors held in host memory.",
                            value=getattr(stats, "adapter_host_cache_bytes", 0))
    c = getattr(stats, "adapter_counters", None) or AdapterCounters()
    for name, doc, value in (
            ("adapter_loads", "Non-resident adapters brought into a device slot.", c.loads_total),
            ("adapter_disk_loads", "Adapter reads from disk (file read + validation).", c.disk_loads_total),
            ("adapter_load_failures", "Adapter loads that failed (the adapter's requests fail).",
             c.load_failures_total),
            ("adapter_evictions", "Resident adapters evicted from their slot.", c.evictions_total),
            ("adapter_host_cache_hits", "Slot loads served from the host-memory adapter cache.",
             c.cache_hits_total)):
        yield CounterMetricFamily(f"mtlora:{name}", doc, value=value)
    buckets = [(str(b), n) for b, n in zip(c.wait_bounds, c.wait_buckets)] + [("+Inf", c.wait_count)]
    yield HistogramMetricFamily("mtlora:adapter_wait_seconds", "Time a request waited for its adapter to become "
                                "resident.", buckets=buckets, sum_value=c.wait_sum)


class Metrics:
    """All metrics of one app. `render()` returns the Prometheus text exposition."""

    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("mtlora:requests", "Finished sequences by adapter and finish reason.",
                                ["adapter", "finish_reason"], registry=self.registry)
        self.rejected = Counter("mtlora:requests_rejected", "Requests refused at admission, by adapter and reason.",
                                ["adapter", "reason"], registry=self.registry)
        self.errors = Counter("mtlora:request_errors", "Error responses by HTTP status code.", ["code"],
                              registry=self.registry)
        self.prompt_tokens = Counter("mtlora:prompt_tokens", "Prompt tokens by adapter.", ["adapter"],
                                     registry=self.registry)
        self.generation_tokens = Counter("mtlora:generation_tokens", "Generated tokens by adapter.", ["adapter"],
                                         registry=self.registry)
        self.ttft = Histogram("mtlora:time_to_first_token_seconds", "Arrival to first generated token.",
                              ["adapter"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("mtlora:inter_token_latency_seconds", "Gap between successive token outputs.",
                             ["adapter"], buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("mtlora:e2e_request_latency_seconds", "Arrival to the last output of a finished request.",
                             ["adapter"], buckets=E2E_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("mtlora:request_queue_time_seconds",
                                    "Arrival to the first scheduling by the engine.", ["adapter"],
                                    buckets=QUEUE_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

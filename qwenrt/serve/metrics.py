"""``GET /metrics``: the server's counters in Prometheus' text format, through prometheus_client.

Names follow Prometheus' conventions (base units, ``_total`` for counters) and the figures
an inference server is watched by: requests by outcome, tokens in and out, the queue and
the generations running, the first token's latency from arrival (queueing included, as a
client sees it) and the time between tokens. Each app has a registry of its own, so two
servers in one process (tests) do not share figures.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Outcomes of a request, as /metrics labels them.
OUTCOMES = ("completed", "refused", "cancelled", "failed")
# First token: from a few ms (short prompt, idle server) to seconds (long prompt, queue).
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Between tokens: a 0.5B model decodes at tens of tokens/s on a few cores, faster on tiny models.
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: str, model: str, queued: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._labels = {"engine": engine, "model": model}
        self._info = Info("qwenrt_server", "The engine and model this server runs", registry=self.registry)
        self._info.info(self._labels)
        self.requests = Counter("qwenrt_requests", "Requests answered, by outcome", ["outcome"],
                                registry=self.registry)  # fmt: skip
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome shows, at 0 until it happens
        self.prompt_tokens = Counter("qwenrt_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.generated_tokens = Counter("qwenrt_generation_tokens", "Tokens generated", registry=self.registry)
        Gauge("qwenrt_requests_waiting", "Requests waiting for a place in the engine",
              registry=self.registry).set_function(queued)  # fmt: skip
        Gauge("qwenrt_requests_running", "Generations running in the engine",
              registry=self.registry).set_function(running)  # fmt: skip
        self.first_token = Histogram("qwenrt_time_to_first_token_seconds",
                                     "From a request's arrival to its first token", buckets=FIRST_TOKEN_BUCKETS,
                                     registry=self.registry)  # fmt: skip
        self.inter_token = Histogram("qwenrt_inter_token_latency_seconds", "Between two tokens of one answer",
                                     buckets=INTER_TOKEN_BUCKETS, registry=self.registry)  # fmt: skip

    def engine_ready(self, threads: int, parallel: int) -> None:
        """The engine is open: its threads and the requests it runs at once join the labels."""
        self._info.info({**self._labels, "threads": str(threads), "parallel": str(parallel)})

    def render(self) -> bytes:
        return generate_latest(self.registry)

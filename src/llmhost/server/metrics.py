"""Prometheus metrics, one registry per app (no module globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llmhost.engine.chunks import Chunk

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, queued: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmhost_requests", "HTTP API requests by route and status.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("llmhost_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("llmhost_completion_tokens", "Tokens generated.", registry=r)
        self.cached_tokens = Counter(
            "llmhost_prompt_tokens_cached",
            "Prompt tokens not evaluated again: their KV cache was reused from an earlier request.",
            registry=r,
        )
        self.ttft = Histogram(
            "llmhost_time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "llmhost_time_per_output_token_seconds",
            "Decode time per generated token after the first.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._proposed = self._accepted = 0  # the rate's terms (prometheus counters hide theirs)
        self.draft_tokens = Counter(
            "llmhost_speculative_draft_tokens", "Tokens prompt-lookup speculation proposed.", registry=r
        )
        self.accepted_tokens = Counter(
            "llmhost_speculative_accepted_tokens",
            "Proposed tokens sampled as proposed: each one a decode step saved.",
            registry=r,
        )
        Gauge(
            "llmhost_speculative_acceptance_rate", "Accepted over proposed tokens since start.", registry=r
        ).set_function(self._acceptance)
        Gauge("llmhost_queue_length", "Requests waiting for a batch slot.", registry=r).set_function(queued)
        Gauge("llmhost_running_requests", "Requests being decoded.", registry=r).set_function(running)

    def finished(self, last: Chunk) -> None:
        self.prompt_tokens.inc(last.prompt_tokens)
        self.completion_tokens.inc(last.completion_tokens)
        self.cached_tokens.inc(last.cached_tokens)
        self.draft_tokens.inc(last.draft_tokens)
        self.accepted_tokens.inc(last.accepted_tokens)
        self._proposed += last.draft_tokens
        self._accepted += last.accepted_tokens
        if last.ttft_s is not None:
            self.ttft.observe(last.ttft_s)
        if last.decode_tps:
            self.tpot.observe(1.0 / last.decode_tps)

    def _acceptance(self) -> float:
        return self._accepted / self._proposed if self._proposed else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)

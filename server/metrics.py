"""Every metric idp-serve defines, in one place (prometheus-client, default registry).

They live in the default registry next to vLLM's own `vllm:*` families (vLLM registers there when its stats are
on), so `/metrics` shows both. Metric objects are module globals on purpose: prometheus-client keys them by name,
and one process serves one model.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REQUESTS = Counter(
    "idp_requests", "API requests by endpoint and IDP mode.", ["endpoint", "mode"]
)
PROMPT_CHOSEN = Counter(
    "idp_prompt_chosen", "Inputs decoded with each soft prompt (mode dynamic or forced).", ["bank", "prompt", "mode"]
)
SELECTION_SECONDS = Histogram(
    "idp_selection_seconds",
    "Wall time of one selection pass (all inputs batched in it).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SELECTION_BATCH = Histogram(
    "idp_selection_batch_size", "Inputs scored per selection pass.", buckets=(1, 2, 4, 8, 16, 32, 64)
)


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

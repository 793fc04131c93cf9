"""Reading `/metrics` in tests, with prometheus_client's own parser (what Prometheus reads is
what the tests read)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` with exactly `labels` in an exposition.

    `name` may carry its labels as written in the exposition
    (`ingester_compensations_total{outcome="retry"}`). A family the process declares but
    has no sample of with these labels (a counter never counted for them) is 0.0; a name
    the exposition does not know at all fails the test, so a misspelt metric cannot pass
    as a zero.
    """
    if "{" in name:
        name, _, written = name.partition("{")
        (family,) = text_string_to_metric_families(f"x{{{written} 0\n")
        labels = {**family.samples[0].labels, **labels}
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES)
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    if name in declared:
        return 0.0
    raise AssertionError(f"{name} is not in /metrics")


# The samples a family declared with `# TYPE` may have: its name with these.
_SAMPLE_SUFFIXES = ("", "_total", "_created", "_count", "_sum", "_bucket")


async def read_metric(url: str, name: str, **labels: str) -> float:
    """`metric` of a process's `/metrics`, asked now."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        response = await http.get(url.rstrip("/") + "/metrics")
    assert response.status_code == 200, response.text
    return metric(response.text, name, **labels)

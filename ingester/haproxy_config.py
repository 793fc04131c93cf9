"""haproxy in front of ingester replicas: the one configuration, rendered. Pure: no I/O.

`deploy/haproxy/haproxy.cfg` is this rendered for three replicas (a test keeps them equal),
and `ingester dev --replicas N` renders it for its own. Why each line is what it is:

- **Checks** `GET /health/ready` every second, down after 2 failures, up after 2 successes:
  a dead replica (connection refused) or a draining one (readiness 503 from SIGTERM on) is
  out within about 2 s. On the internal listener's port when replicas have one
  (`INGESTER_INTERNAL_PORT`), where readiness lives with its detail.
- **Draining**: a server marked down keeps its requests in flight (no `on-marked-down
  shutdown-sessions`): they finish within the replica's `INGESTER_SHUTDOWN_GRACE_S`. Until it
  is marked down, a draining replica answers new uploads `503 SHUTTING_DOWN` with
  `Retry-After`; a request small enough to be kept in haproxy's buffer (tus `HEAD`, `POST`,
  a small `PATCH`, a small multipart upload) is retried on another replica by haproxy itself
  (`retry-on conn-failure 503`: every 503 of ours means nothing was done), a larger one goes
  back to the client, which retries after `Retry-After`.
- **No stickiness**: any replica serves any request (state in Redis, tus data on the shared
  spool). `leastconn`, since uploads are long and uneven.
- **Timeouts for large uploads**: haproxy streams bodies both ways (no buffering, no size
  limit). `timeout server`/`client` are inactivity timeouts, and the longest silence of a
  healthy exchange is a tus final `PATCH` waiting for the store (`INGESTER_TUS_COMPLETION_WAIT_S`,
  600 s): 660 s. The ingester enforces the client-side limits itself (idle, minimum rate,
  header time) with its own error codes; `timeout http-request` (15 s) is only a backstop
  above `INGESTER_HEADER_TIMEOUT_S` (10 s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

CHECK_INTERVAL_S: Final = 1
CHECK_FALL: Final = 2
CHECK_RISE: Final = 2
# How long a replica behind this haproxy keeps listening after SIGTERM
# (INGESTER_DRAIN_DELAY_S): the checks' time to mark it down (FALL failures, one interval
# apart, plus the interval already begun). Sooner, its port closes while haproxy still
# sends it requests, and one sent on a kept-alive connection as it closes reaches the
# client as a dropped connection (seen once in a rolling restart under load).
DRAIN_DELAY_S: Final = (CHECK_FALL + 1) * CHECK_INTERVAL_S
# Above INGESTER_TUS_COMPLETION_WAIT_S (600 s), the longest a healthy request is silent.
STREAM_TIMEOUT: Final = "660s"


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    address: str  # host:port of the public listener
    check_port: int | None = None  # the internal listener's, when the replica has one


def render(
    bind: str,
    servers: Sequence[Server],
    *,
    stats_bind: str | None = None,
    names_may_not_resolve: bool = False,
) -> str:
    """haproxy.cfg for `servers` behind `bind` (`host:port`). `names_may_not_resolve`: start
    even when a server's name does not resolve yet (a replica not scheduled yet); it stays
    out of rotation until it does."""
    init_addr = " init-addr last,libc,none" if names_may_not_resolve else ""
    lines = [
        "# haproxy in front of artStore Ingester replicas (Debian's haproxy 2.6).",
        "# Rendered by ingester/haproxy_config.py, whose docstring gives each choice its reason.",
        "global",
        "    maxconn 4096",
        "    log stdout format raw local0",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option forwardfor",
        "    timeout connect 5s",
        f"    timeout client {STREAM_TIMEOUT}",
        f"    timeout server {STREAM_TIMEOUT}",
        "    timeout http-request 15s",
        "    timeout http-keep-alive 10s",
        "    timeout queue 30s",
        "    timeout check 2s",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure 503",
        "",
        "frontend ingester",
        f"    bind {bind}",
        "    default_backend replicas",
        "",
        "backend replicas",
        "    balance leastconn",
        "    option httpchk",
        "    http-check send meth GET uri /health/ready",
        "    http-check expect status 200",
        f"    default-server check inter {CHECK_INTERVAL_S}s fall {CHECK_FALL} rise {CHECK_RISE}"
        + init_addr,
    ]
    for server in servers:
        port = f" port {server.check_port}" if server.check_port is not None else ""
        lines.append(f"    server {server.name} {server.address}{port}")
    if stats_bind is not None:
        lines += [
            "",
            "# Which replicas are up, as haproxy sees them (CSV: /stats;csv).",
            "frontend stats",
            f"    bind {stats_bind}",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 1s",
        ]
    return "\n".join(lines) + "\n"

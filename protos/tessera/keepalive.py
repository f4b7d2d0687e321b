"""HTTP/2 keepalive between Tessera's processes: both ends of a channel agree on it.

A scheduler keeps a channel to each agent open for as long as the agent is
registered (see ``scheduler.service.agent_connections``), mostly idle between
Places. A connection that a firewall or NAT dropped without a reset, or whose
peer vanished (power lost, a network partitioned), reads as READY until a
call times out on it: the Place that meets it waits out its deadline first.
So every channel pings its peer after :attr:`Keepalive.time_s` without
traffic, calls or not, and drops the connection when a ping goes unanswered
for :attr:`Keepalive.timeout_s`; gRPC reconnects on the next call (or the
next warming round).

Both sides must agree: a server sends a GOAWAY (``too_many_pings``) to a
client that pings without calls, or more often than it allows, so servers
take :meth:`Keepalive.server_options` and clients
:meth:`Keepalive.channel_options` from the same settings. Servers also ping
their clients, so the connection of a vanished client (its socket and
buffers; every RPC here is unary) is closed rather than kept for ever.

A peer built before these settings (gRPC's default server: pings without
calls allowed every two hours) sends such a client away at its fourth
idle ping, about four minutes, with GOAWAY ``too_many_pings``: until both
ends of a connection run this version (a rolling upgrade), idle
connections are dropped and made again (a TLS handshake) every few minutes.

Cost: about one ping and its acknowledgement a minute per idle connection
(both ends ping, whichever's timer fires first), a few hundred bytes. Each
agent holds a connection from every scheduler replica and one to the
scheduler: with one replica, ten thousand agents make two to four
hundred pings a second at the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keepalive:
    """When a connection is checked, and how long an unanswered check is waited for.

    Attributes:
        time_s: seconds without traffic after which a ping is sent.
        timeout_s: seconds a ping may go unanswered before the connection
            is dropped.
    """

    time_s: float = 60.0
    timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.time_s <= 86_400 or not 0 < self.timeout_s <= 86_400:
            raise ValueError(
                f"keepalive time and timeout must lie in (0, 86400] s, "
                f"not {self.time_s} and {self.timeout_s}"
            )

    def channel_options(self) -> list[tuple[str, int]]:
        """A client channel's options: ping when idle, with or without calls."""
        timeout_ms = _ms(self.timeout_s)
        return [
            ("grpc.keepalive_time_ms", _ms(self.time_s)),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            # gRPC 1.80 waits for a ping's acknowledgement this long, whatever
            # the keepalive timeout says (60 s by default): without it an
            # unanswered ping went unnoticed for a minute.
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            # The point is the idle channel: ping with no call in flight, and
            # as often as it stays idle (gRPC stops after two by default).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """A server's options: accept its clients' pings, and ping them too."""
        return [
            # The same pings, sent to the server's clients.
            *self.channel_options(),
            # Pings from an idle client are welcome down to half the agreed
            # interval (timers drift); more often still is a misbehaving
            # client, which gRPC's ping strikes send away.
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.time_s) // 2),
        ]


def _ms(seconds: float) -> int:
    """Whole milliseconds, at least one."""
    return max(1, round(seconds * 1000))


#: The settings every Tessera process uses.
KEEPALIVE = Keepalive()

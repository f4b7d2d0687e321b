"""Tessera's state store: Redis-protocol persistence for hosts and placements.

* :mod:`scheduler.store.schema`: every key name, and which are cross-slot.
* :mod:`scheduler.store.redis_store`: :class:`RedisStateStore`, the atomic
  commit/release of reservations (Lua) and the host registry.
* :mod:`scheduler.store.safety`: refuses a Redis that could lose or evict state.
* :mod:`scheduler.store.embedded`: the Valkey child process used when no
  external Redis is configured.

Nothing here imports gRPC or protobuf: payloads are opaque bytes.
"""

"""The scheduling core: pure functions over immutable snapshots.

Nothing in this package performs I/O or imports Redis, gRPC or the wire
contract (an import-linter contract enforces it). The edges convert protobuf
messages into these types, hand a snapshot in, and get a plan out.
"""

"""Protobuf wire encoding by hand, for fuzzers that build bodies no message class would."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """``n`` as a protobuf varint (a field key, or the length of a nested message)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)

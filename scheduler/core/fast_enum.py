"""Enumerations hashed by identity: the engine's hot loops key dicts and sets on them.

An :class:`enum.Enum` member hashes through Python code (the hash of its
name). Members are singletons that compare by identity, so hashing by
identity, in C, gives the same dict and set behaviour at a fraction of the
cost: the engine hashes (domain, instance) keys, device kinds and modes
dozens of times per host state it indexes. Hashes differ between processes,
as those of strings do; nothing may persist them.
"""

from __future__ import annotations

import enum


class IdentityHashedEnum(enum.Enum):
    """An enumeration whose members hash by identity (see the module)."""

    __hash__ = object.__hash__

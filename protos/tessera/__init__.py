"""Tessera wire contract (generated code lives in tessera.v1)."""

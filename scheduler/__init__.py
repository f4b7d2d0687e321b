"""Tessera scheduler: places tenant requests on hosts and commits them to Redis."""

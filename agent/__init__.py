"""Tessera agent: discovers its host from sysfs and NVML and carries placements out."""

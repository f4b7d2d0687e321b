"""MIG GPU-instance profiles NVIDIA defines, per GPU model.

Source: ``shared/reference/mig_profiles.json`` (NVIDIA MIG User Guide v580 and
real ``nvidia-smi mig -lgip/-lgipp`` dumps). Placements count memory slices
(8 per GPU) as ``(start, size)``; the same placements hold on A100, H100 and
H100 NVL (confirmed) and H200 (inferred). The request validator uses the
names; MIG placement (a later increment) uses the geometry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NewType

MigProfileName = NewType("MigProfileName", str)

#: A placement as nvidia-smi prints it: ``(start, size)`` in memory slices.
Placement = tuple[int, int]

#: Placements by slice count of a profile, identical on every listed GPU.
_PLACEMENTS_1 = ((0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1))
_PLACEMENTS_1_DOUBLE_MEMORY = ((0, 2), (2, 2), (4, 2), (6, 2))
_PLACEMENTS_2 = ((0, 2), (2, 2), (4, 2))
_PLACEMENTS_3 = ((0, 4), (4, 4))
_PLACEMENTS_4 = ((0, 4),)
_PLACEMENTS_7 = ((0, 8),)


@dataclass(frozen=True)
class MigProfile:
    """One GPU-instance profile.

    Attributes:
        name: nvidia-smi's name, "3g.40gb".
        profile_id: the profile ID (not the NVML index).
        slices: compute slices (of 7).
        placements: allowed (start, size) in memory slices (of 8).
    """

    name: MigProfileName
    profile_id: int
    slices: int
    placements: tuple[tuple[int, int], ...]


def _family(mem: tuple[str, str, str, str, str, str]) -> tuple[MigProfile, ...]:
    """The seven standard profiles of a GPU, named with its memory sizes.

    ``mem`` holds the memory part of the names for 1g, 1g (double memory),
    2g, 3g, 4g and 7g profiles, e.g. ("10gb", "20gb", "20gb", "40gb", "40gb",
    "80gb").
    """
    m1, m1d, m2, m3, m4, m7 = mem
    return (
        MigProfile(MigProfileName(f"1g.{m1}"), 19, 1, _PLACEMENTS_1),
        MigProfile(MigProfileName(f"1g.{m1}+me"), 20, 1, _PLACEMENTS_1),
        MigProfile(MigProfileName(f"1g.{m1d}"), 15, 1, _PLACEMENTS_1_DOUBLE_MEMORY),
        MigProfile(MigProfileName(f"2g.{m2}"), 14, 2, _PLACEMENTS_2),
        MigProfile(MigProfileName(f"3g.{m3}"), 9, 3, _PLACEMENTS_3),
        MigProfile(MigProfileName(f"4g.{m4}"), 5, 4, _PLACEMENTS_4),
        MigProfile(MigProfileName(f"7g.{m7}"), 0, 7, _PLACEMENTS_7),
    )


#: Profiles per MIG table, keyed as mig_profiles.json names the GPUs.
MIG_TABLES: Mapping[str, tuple[MigProfile, ...]] = {
    "A100-SXM4-40GB": _family(("5gb", "10gb", "10gb", "20gb", "20gb", "40gb")),
    "A100-80GB": _family(("10gb", "20gb", "20gb", "40gb", "40gb", "80gb")),
    "H100-80GB": _family(("10gb", "20gb", "20gb", "40gb", "40gb", "80gb")),
    "H100-NVL-94GB": _family(("12gb", "24gb", "24gb", "47gb", "47gb", "94gb")),
    "H200-141GB": _family(("18gb", "35gb", "35gb", "71gb", "71gb", "141gb")),
}

#: Every profile name some supported GPU offers.
KNOWN_PROFILE_NAMES: frozenset[str] = frozenset(
    p.name for table in MIG_TABLES.values() for p in table
)


@dataclass(frozen=True, order=True)
class GpuInstance:
    """One occupied GPU instance.

    Attributes:
        start: first memory slice it occupies.
        size: memory slices it occupies.
        profile_id: its GI profile ID (not the NVML index).
        slices: compute slices it uses.
    """

    start: int
    size: int
    profile_id: int
    slices: int

    @property
    def placement(self) -> Placement:
        """Its ``(start, size)``."""
        return (self.start, self.size)

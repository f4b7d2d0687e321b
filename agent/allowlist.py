"""The operator's allow-list: which PCI functions this agent may hand to tenants.

``tessera-agent run --allow SPEC`` (repeatable, or ``TESSERA_AGENT_ALLOW``
comma-separated) names what the agent may touch. A SPEC is one of:

* a PCI address: ``0000:4b:00.0``;
* a vendor:device id, the device may be ``*``: ``10de:20b5``, ``15b3:*``;
* a class prefix of 2, 4 or 6 hex digits: ``class=0302``, ``class=02``.

Without any SPEC the list is :data:`DEFAULT_CLASSES`: the base classes the
scheduler offers to tenants (display, network, processing accelerators), so
the agent touches nothing the scheduler would not place anyway.

Besides the functions a SPEC matches, a function is allowed when:

* it is an SR-IOV VF and its PF is allowed (a VF is never allowed on its own:
  creating it writes to the PF);
* its class is none the scheduler offers (a GPU's HDMI audio or USB-C
  controller) and an offered function of the same slot is allowed, so that
  passthrough of the GPU's IOMMU group can take its companions along.

Bridges (base class 06: host, ISA and PCI-to-PCI bridges) are never reported
as outside the list: the scheduler never offers one, whatever the list says.

A function that is not allowed is reported with ``host_use`` =
:data:`NOT_ALLOWED` (the scheduler then offers neither it nor its IOMMU group)
and Prepare refuses any placement touching it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tessera.agent.probes.pci import PciAddress, PciFunction, is_pci_address

#: The ``host_use`` reason of a function outside the allow-list.
NOT_ALLOWED = "not in the agent's allow-list"

#: Base classes the scheduler offers to tenants: display 03, network 02,
#: processors 0b, encryption 10, processing accelerators 12.
DEFAULT_CLASSES = ("03", "02", "0b", "10", "12")

#: Base class of bridges, never offered and never reported here.
_BRIDGE_CLASS = 0x06

_ID = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{4}|\*)$")
_CLASS = re.compile(r"^(?:[0-9a-f]{2}){1,3}$")


@dataclass(frozen=True)
class AddressSpec:
    """One function by PCI address."""

    address: str

    def matches(self, fn: PciFunction) -> bool:
        """Whether ``fn`` is this function."""
        return fn.address == self.address

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True)
class IdSpec:
    """Functions by vendor id and device id (None: any device of the vendor)."""

    vendor_id: int
    device_id: int | None

    def matches(self, fn: PciFunction) -> bool:
        """Whether ``fn`` has these ids."""
        return fn.vendor_id == self.vendor_id and self.device_id in (None, fn.device_id)

    def __str__(self) -> str:
        device = "*" if self.device_id is None else f"{self.device_id:04x}"
        return f"{self.vendor_id:04x}:{device}"


@dataclass(frozen=True)
class ClassSpec:
    """Functions whose 24-bit class code (6 hex digits) starts with ``prefix``."""

    prefix: str

    def matches(self, fn: PciFunction) -> bool:
        """Whether ``fn``'s class code starts with the prefix."""
        return f"{fn.class_code:06x}".startswith(self.prefix)

    def __str__(self) -> str:
        return f"class={self.prefix}"


AllowSpec = AddressSpec | IdSpec | ClassSpec


def parse_spec(text: str) -> AllowSpec:
    """Parse one SPEC.

    Raises:
        ValueError: naming the SPEC and the forms accepted.
    """
    spec = text.strip().lower()
    if spec.startswith("class="):
        prefix = spec.removeprefix("class=").removeprefix("0x")
        if _CLASS.match(prefix):
            return ClassSpec(prefix)
    elif is_pci_address(spec):
        return AddressSpec(spec)
    elif (m := _ID.match(spec)) is not None:
        device = None if m.group(2) == "*" else int(m.group(2), 16)
        return IdSpec(int(m.group(1), 16), device)
    raise ValueError(
        f"allow-list entry {text!r}: expected a PCI address (0000:4b:00.0), "
        "VENDOR:DEVICE (10de:20b5, 15b3:*) or class=PREFIX (class=0302)"
    )


def _slot(address: str) -> str:
    return address.rsplit(".", 1)[0]


def _offered(fn: PciFunction) -> bool:
    return f"{fn.class_code:06x}"[:2] in DEFAULT_CLASSES


@dataclass(frozen=True)
class AllowList:
    """What the agent may hand over.

    Attributes:
        specs: the operator's entries; :data:`DEFAULT_CLASSES` when none.
    """

    specs: tuple[AllowSpec, ...]

    @classmethod
    def default(cls) -> AllowList:
        """Every function of a class the scheduler offers (and its companions)."""
        return cls(tuple(ClassSpec(c) for c in DEFAULT_CLASSES))

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """From ``--allow`` values (each may hold several, comma-separated).

        No entry at all gives :meth:`default`.

        Raises:
            ValueError: an entry is malformed.
        """
        specs = tuple(parse_spec(s) for e in entries for s in e.split(",") if s.strip())
        return cls(specs) if specs else cls.default()

    def __str__(self) -> str:
        return ", ".join(str(s) for s in self.specs)

    def _matches(self, fn: PciFunction) -> bool:
        return any(spec.matches(fn) for spec in self.specs)

    def refusal(self, address: str, functions: Mapping[PciAddress, PciFunction]) -> str | None:
        """:data:`NOT_ALLOWED` if the function may not be handed over, else None.

        Args:
            address: the function.
            functions: the host's functions; at least ``address``, its PF
                and the other functions of its slot.
        """
        fn = functions.get(PciAddress(address))
        if fn is None or fn.is_bridge or fn.class_code >> 16 == _BRIDGE_CLASS:
            return None
        if fn.physfn is not None and fn.physfn in functions:
            return self.refusal(fn.physfn, functions)
        if self._matches(fn):
            return None
        if not _offered(fn):
            slot = _slot(address)
            for other in functions.values():
                if (
                    other.address != address
                    and _slot(other.address) == slot
                    and _offered(other)
                    and self._matches(other)
                ):
                    return None
        return NOT_ALLOWED

    def refusals(self, functions: Mapping[PciAddress, PciFunction]) -> dict[PciAddress, str]:
        """Each function of the host that may not be handed over, with why."""
        return {a: why for a in functions if (why := self.refusal(a, functions)) is not None}

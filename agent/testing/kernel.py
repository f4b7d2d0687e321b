"""A kernel emulator for fake host trees: sysfs writes with Linux's effects and errno.

:class:`KernelEmulator` implements :class:`agent.sysfs.SysfsWriter` for a tree
built by :class:`agent.testing.fakesysfs.FakeSysfs`. Each ``write`` is one
``write(2)`` to a sysfs attribute: the emulator finds which attribute it is
(through ``bus/pci/devices/<bdf>`` links or the real ``devices/...`` path),
checks it the way the kernel's ``store()`` would and changes the tree the way
the kernel would, or raises ``OSError`` with the kernel's errno.

Emulated (HW_FACTS §2, §3, §5, §6, §7; ``sysfs_formats.json``):

* ``<dev>/driver_override``, ``drivers/<drv>/{bind,unbind,new_id,remove_id}``,
  ``bus/pci/drivers_probe``, including vfio-pci's probe failures and
  ``/dev/vfio/<N>``;
* ``<pf>/sriov_numvfs`` and ``sriov_drivers_autoprobe``: VFs are created and
  removed with their groups, links and driver probing;
* ``mdev_supported_types/<t>/create`` and ``<mdev>/remove``;
* ``enable``, ``numa_node``, ``reset``, ``reset_method`` and
  ``iommu_groups/<N>/type``.

Errno choices where the reference leaves room:

* A write to a read-only attribute gives **EACCES**: kernfs refuses to open a
  file without a ``store`` op for writing, for root too. The tree's file modes
  (0444/0644/0200) say which attributes are writable.
* ``iommu_groups/<N>/type`` with a driver bound in the group gives **EBUSY**
  (the 5.x behaviour; newer kernels say EPERM, unconfirmed).
* Writable attributes that are not emulated (``remove``, ``rescan``,
  ``sriov_vf_msix_count``) give **EOPNOTSUPP**, which no kernel returns, so a
  test that hits one fails loudly.
* A path that does not exist gives ENOENT; a directory gives EISDIR.

Not emulated: userspace holding a VFIO device open (the kernel would block an
unbind, a VF removal or an mdev removal; here they succeed at once), DMA
ownership conflicts at bind time (no process ever opens a group here) and
no-IOMMU mode VFIO.

With ``TESSERA_FAKE_CRASH_AFTER_WRITES=N`` the process is SIGKILLed right
after the N-th write that took effect (:mod:`agent.testing.crash`).

Each write is atomic: it is checked and planned on an in-memory view first,
and the tree is only touched once nothing can fail any more. Writes from
different threads or processes are serialised with ``flock`` on
``root/.tessera-fake-host.lock``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from tessera.agent.sysfs import FAKE_HOST_MARKER
from tessera.agent.testing.crash import after_write
from tessera.agent.testing.fakesysfs import (
    MODE_RO,
    MODE_RW,
    MODE_WO,
    VF_LINK,
    DeviceAttrs,
    GroupingNode,
    PciId,
    Role,
    assign_group,
    format_bdf,
    format_cpulist,
    format_cpumask,
    group_files,
    is_bdf,
    make_link,
    mdev_type_files,
    parse_bdf,
    parse_cpulist,
    write_attr,
)

#: Name of the lock file next to the marker.
LOCK_FILE = FAKE_HOST_MARKER + ".lock"

#: ``PAGE_SIZE - 1``: ``driver_set_override`` refuses values this long.
_OVERRIDE_MAX = 4095

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)

_GROUP_TYPES = ("DMA", "DMA-FQ", "identity", "auto")

_RESET_METHODS = ("device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus")


def _fail(code: int, path: Path | str, why: str | None = None) -> NoReturn:
    msg = os.strerror(code) if why is None else f"{os.strerror(code)} ({why})"
    raise OSError(code, msg, str(path))


def _streq(data: str) -> str:
    """The value ``sysfs_streq`` compares: one trailing newline dropped."""
    return data[:-1] if data.endswith("\n") else data


def _kstrtoull(data: str, base: int = 0) -> int | None:
    """``kstrtoull``: None on a parse error (EINVAL); one trailing newline allowed."""
    s = _streq(data)
    if s.startswith("+"):
        s = s[1:]
    if base == 0:
        if s[:2].lower() == "0x" and len(s) > 2:
            base, s = 16, s[2:]
        elif s.startswith("0") and len(s) > 1:
            base, s = 8, s[1:]
        else:
            base = 10
    elif base == 16 and s[:2].lower() == "0x":
        s = s[2:]
    digits = (string.digits + string.ascii_lowercase)[:base]
    if not s or any(c not in digits for c in s.lower()):
        return None
    return int(s, base)


def _kstrtoint(data: str) -> int | None:
    """``kstrtoint(buf, 0)``: None on a parse error."""
    s = _streq(data)
    neg = s.startswith("-")
    value = _kstrtoull(s[1:] if neg else s)
    if value is None:
        return None
    return -value if neg else value


def _kstrtobool(data: str) -> bool | None:
    """``kstrtobool``: None when not a boolean."""
    s = data.lower()
    if not s:
        return None
    if s[0] in "y1":
        return True
    if s[0] in "n0":
        return False
    if s[:2] == "on":
        return True
    if s[:2] == "of":
        return False
    return None


def _readlink_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _read(path: Path) -> str:
    return path.read_text().rstrip("\n")


@dataclass
class _Dev:
    """One PCI function as the emulator sees it."""

    bdf: str
    path: Path
    vendor: int
    device: int
    class_code: int
    driver: str | None
    override: str | None
    group: int | None
    physfn: str | None
    numvfs: int
    autoprobe: bool
    node: GroupingNode
    reset_methods: tuple[str, ...]


@dataclass
class _Mdev:
    uuid: str
    path: Path
    parent: str
    type_id: str
    group: int | None


class _Tx:
    """The file-system changes of one write, applied only by :meth:`commit`."""

    def __init__(self) -> None:
        self._ops: list[Callable[[], None]] = []
        # (created?, path as a string) in order: what the tree will look like
        # after commit. Strings: enabling 64 VFs plans ~1,500 changes and asks
        # exists() about each VF's group, so comparing Paths part by part made
        # that one write take seconds.
        self._log: list[tuple[bool, str]] = []

    def exists(self, path: Path) -> bool:
        """Whether ``path`` will exist once the planned changes are applied."""
        s = str(path)
        below = s + "/"
        for created, p in reversed(self._log):
            if created and (p == s or p.startswith(below)):
                return True  # planned, or an ancestor of something planned
            if not created and (p == s or s.startswith(p + "/")):
                return False  # removed, or inside something removed
        return os.path.lexists(path)

    def write(self, path: Path, content: str, mode: int) -> None:
        self._log.append((True, str(path)))
        self._ops.append(lambda: write_attr(path, content, mode))

    def write_files(self, directory: Path, files: dict[str, tuple[str, int]]) -> None:
        for name, (content, mode) in files.items():
            self.write(directory / name, content, mode)

    def link(self, link: Path, target: Path) -> None:
        self._log.append((True, str(link)))
        self._ops.append(lambda: make_link(link, target))

    def mkdir(self, path: Path) -> None:
        self._log.append((True, str(path)))
        self._ops.append(lambda: path.mkdir(parents=True, exist_ok=True))

    def unlink(self, path: Path) -> None:
        self._log.append((False, str(path)))

        def op() -> None:
            if os.path.lexists(path):
                os.unlink(path)

        self._ops.append(op)

    def rmtree(self, path: Path) -> None:
        self._log.append((False, str(path)))
        self._ops.append(lambda: shutil.rmtree(path, ignore_errors=True))

    def commit(self) -> None:
        for op in self._ops:
            op()


class _State:
    """The tree and the marker, loaded for one write, then planned upon."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.meta: dict[str, Any] = json.loads((root / FAKE_HOST_MARKER).read_text())
        self.meta_dirty = False
        self.devs: dict[str, _Dev] = {}
        devices = self.sys / "bus" / "pci" / "devices"
        for bdf in sorted(os.listdir(devices)):
            self.devs[bdf] = self._load_dev(bdf, Path(os.path.realpath(devices / bdf)))
        groups_dir = self.sys / "kernel" / "iommu_groups"
        self.groups: set[int] = (
            {int(n) for n in os.listdir(groups_dir)} if groups_dir.is_dir() else set()
        )
        self.mdevs: dict[str, _Mdev] = {}
        mdev_bus = self.sys / "bus" / "mdev" / "devices"
        if mdev_bus.is_dir():
            for uuid in sorted(os.listdir(mdev_bus)):
                path = Path(os.path.realpath(mdev_bus / uuid))
                group = _readlink_name(path / "iommu_group")
                self.mdevs[uuid] = _Mdev(
                    uuid,
                    path,
                    path.parent.name,
                    _readlink_name(path / "mdev_type") or "",
                    int(group) if group is not None else None,
                )

    def _load_dev(self, bdf: str, path: Path) -> _Dev:
        physfn = _readlink_name(path / "physfn")
        info = self.meta["functions"].get(bdf)
        parent = path.parent.name if is_bdf(path.parent.name) else None
        if info is None:
            # A VF: a single-function PCIe endpoint (HW_FACTS §3).
            node = GroupingNode(bdf, parent, Role.ENDPOINT, True, False, False, is_vf=True)
            resets: tuple[str, ...] = ("flr",)
        else:
            node = GroupingNode(
                bdf,
                parent,
                Role(info["role"]),
                bool(info["pcie"]),
                bool(info["acs"]),
                bool(info["multifunction"]),
                is_vf=physfn is not None,
            )
            resets = tuple(info["reset_methods"])
        override = _read(path / "driver_override")
        group = _readlink_name(path / "iommu_group")
        numvfs = path / "sriov_numvfs"
        autoprobe = path / "sriov_drivers_autoprobe"
        return _Dev(
            bdf=bdf,
            path=path,
            vendor=int(_read(path / "vendor"), 16),
            device=int(_read(path / "device"), 16),
            class_code=int(_read(path / "class"), 16),
            driver=_readlink_name(path / "driver"),
            override=None if override == "(null)" else override,
            group=int(group) if group is not None else None,
            physfn=physfn,
            numvfs=int(_read(numvfs)) if numvfs.exists() else 0,
            autoprobe=_read(autoprobe) == "1" if autoprobe.exists() else True,
            node=node,
            reset_methods=resets,
        )

    # -- queries -------------------------------------------------------------

    def driver_meta(self, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.meta["drivers"].get(name)
        return result

    def group_dir(self, number: int) -> Path:
        return self.sys / "kernel" / "iommu_groups" / str(number)

    def group_members(self, number: int) -> list[_Dev]:
        return [d for d in self.devs.values() if d.group == number]

    def vfs_of(self, pf: str) -> list[_Dev]:
        return [d for d in self.devs.values() if d.physfn == pf]

    def allocate_group(self) -> int:
        """The lowest free group number (``ida_alloc``), reserved at once."""
        n = 0
        while n in self.groups:
            n += 1
        self.groups.add(n)
        return n

    def can_probe(self, dev: _Dev) -> bool:
        """``pci_device_can_probe``."""
        if dev.physfn is None or dev.override is not None:
            return True
        return self.devs[dev.physfn].autoprobe

    def matches(self, dev: _Dev, name: str) -> bool:
        """``pci_match_device``: the override beats every id table."""
        drv = self.driver_meta(name)
        if drv is None:
            return False
        if dev.override is not None:
            return dev.override == name
        ids = [PciId.from_json(i) for i in drv["dynamic_ids"]]
        ids += [i for i in map(PciId.from_json, drv["ids"]) if not i.override_only]
        return any(i.matches(dev.vendor, dev.device, dev.class_code) for i in ids)

    def probe_error(self, dev: _Dev, name: str) -> int | None:
        """The errno ``name``'s probe of ``dev`` would fail with, or None."""
        if not self.can_probe(dev):
            return errno.ENODEV
        drv = self.driver_meta(name)
        assert drv is not None
        if name == "pcieport" and dev.node.role not in (
            Role.ROOT_PORT,
            Role.SWITCH_UPSTREAM,
            Role.SWITCH_DOWNSTREAM,
        ):
            return errno.ENODEV
        if drv["vfio"]:
            if name == "vfio-pci" and [dev.vendor, dev.device] in self.meta["vfio_denylist"]:
                return errno.EINVAL
            if dev.node.role.is_bridge:
                return errno.EINVAL  # header type is not normal
            if dev.group is None:
                return errno.EINVAL  # no IOMMU group and noiommu is off
            if dev.numvfs:
                return errno.EBUSY  # "Cannot bind to PF with SR-IOV enabled"
        return None

    def mdev_available(self, parent: str, type_meta: dict[str, Any]) -> int:
        """``available_instances`` of one type on ``parent``."""
        info = self.meta["mdev"][parent]
        on_parent = [m for m in self.mdevs.values() if m.parent == parent]
        if info["single_type"] and any(m.type_id != type_meta["id"] for m in on_parent):
            return 0
        used = sum(1 for m in on_parent if m.type_id == type_meta["id"])
        return max(0, int(type_meta["max_instances"]) - used)


class KernelEmulator:
    """Performs sysfs writes on a fake host tree as Linux would.

    Args:
        root: the directory holding ``sys/``, ``dev/`` and the marker.

    Raises:
        FileNotFoundError: ``root`` holds no fake host tree.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        if not (root / FAKE_HOST_MARKER).is_file():
            raise FileNotFoundError(f"{root} holds no fake host tree ({FAKE_HOST_MARKER})")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, path: Path, data: str) -> None:
        """Write ``data`` to the attribute at ``path`` as one ``write(2)``.

        Raises:
            OSError: with the errno Linux would return; the tree is unchanged.
        """
        with self._locked():
            st = _State(self.root)
            tx = _Tx()
            _Write(st, tx, Path(path), data).run()
            tx.commit()
            if st.meta_dirty:
                marker = self.root / FAKE_HOST_MARKER
                tmp = self.root / f".{FAKE_HOST_MARKER}.tmp"
                tmp.write_text(json.dumps(st.meta, indent=1) + "\n")
                os.replace(tmp, marker)
        # Outside the lock: a process killed here must not hold the tree.
        after_write(self.root)


class _Write:
    """One write: find the attribute, check, plan."""

    def __init__(self, st: _State, tx: _Tx, path: Path, data: str) -> None:
        self.st = st
        self.tx = tx
        self.path = path
        self.data = data

    def fail(self, code: int, why: str | None = None) -> NoReturn:
        _fail(code, self.path, why)

    def run(self) -> None:
        real = Path(os.path.realpath(self.path))
        sys_real = Path(os.path.realpath(self.st.sys))
        if not real.is_relative_to(sys_real):
            self.fail(errno.ENOENT, "outside the fake sysfs")
        if not os.path.lexists(real):
            self.fail(errno.ENOENT)
        if real.is_dir():
            self.fail(errno.EISDIR)
        if os.stat(real).st_mode & 0o222 == 0:
            self.fail(errno.EACCES, "read-only attribute")
        parts = real.relative_to(sys_real).parts
        if parts == ("bus", "pci", "drivers_probe"):
            return self.drivers_probe()
        if len(parts) == 5 and parts[:3] == ("bus", "pci", "drivers"):
            drv, op = parts[3], parts[4]
            if op == "bind":
                return self.bind(drv)
            if op == "unbind":
                return self.unbind(drv)
            if op == "new_id":
                return self.new_id(drv)
            if op == "remove_id":
                return self.remove_id(drv)
        if len(parts) == 4 and parts[:2] == ("kernel", "iommu_groups") and parts[3] == "type":
            return self.group_type(int(parts[2]))
        name = real.name
        parent = real.parent
        if name == "create" and parent.parent.name == "mdev_supported_types":
            return self.mdev_create(parent.parent.parent.name, parent.name)
        if name == "remove" and parent.name in self.st.mdevs:
            return self.mdev_remove(self.st.mdevs[parent.name])
        dev = self.st.devs.get(parent.name)
        if dev is not None and dev.path == parent:
            handler = {
                "driver_override": self.driver_override,
                "sriov_numvfs": self.sriov_numvfs,
                "sriov_drivers_autoprobe": self.sriov_autoprobe,
                "enable": self.enable,
                "numa_node": self.numa_node,
                "reset": self.reset,
                "reset_method": self.reset_method,
            }.get(name)
            if handler is not None:
                return handler(dev)
        self.fail(errno.EOPNOTSUPP, "attribute not emulated")

    # -- binding -------------------------------------------------------------

    def _target(self) -> _Dev | None:
        return self.st.devs.get(_streq(self.data))

    def driver_override(self, dev: _Dev) -> None:
        if len(self.data) >= _OVERRIDE_MAX:
            self.fail(errno.EINVAL, "override too long")
        value = self.data.split("\n", 1)[0]
        dev.override = value or None
        self.tx.write(dev.path / "driver_override", f"{value or '(null)'}\n", MODE_RW)

    def bind(self, name: str) -> None:
        dev = self._target()
        if dev is None or not self.st.matches(dev, name):
            self.fail(errno.ENODEV, "no such device or the driver does not match")
        if dev.driver is not None:
            self.fail(errno.EBUSY, f"bound to {dev.driver}")
        code = self.st.probe_error(dev, name)
        if code is not None:
            self.fail(code, f"{name} probe failed")
        self._attach(dev, name)

    def unbind(self, name: str) -> None:
        dev = self._target()
        if dev is None or dev.driver != name:
            self.fail(errno.ENODEV, f"not bound to {name}")
        self._detach(dev)

    def drivers_probe(self) -> None:
        dev = self._target()
        if dev is None:
            self.fail(errno.ENODEV)
        self._probe(dev)

    def _probe(self, dev: _Dev) -> None:
        """``device_attach``: first matching driver whose probe succeeds; errors ignored."""
        if dev.driver is not None:
            return
        for name in self.st.meta["drivers"]:
            if self.st.matches(dev, name) and self.st.probe_error(dev, name) is None:
                self._attach(dev, name)
                return

    def _attach(self, dev: _Dev, name: str) -> None:
        st, tx = self.st, self.tx
        drivers = st.sys / "bus" / "pci" / "drivers"
        dev.driver = name
        tx.link(dev.path / "driver", drivers / name)
        tx.link(drivers / name / dev.bdf, dev.path)
        tx.write(dev.path / "enable", "1\n", MODE_RW)
        if st.meta["drivers"][name]["vfio"] and dev.group is not None:
            for node in (st.dev / "vfio" / str(dev.group), st.dev / "vfio" / "vfio"):
                if not tx.exists(node):
                    tx.write(node, "", 0o600)
        mdev = st.meta["mdev"].get(dev.bdf)
        if mdev is not None and mdev["driver"] == name:
            # mdev_register_parent: the types appear while the vendor driver is bound.
            for t in mdev["types"]:
                tdir = dev.path / "mdev_supported_types" / t["id"]
                tx.write_files(tdir, mdev_type_files(t, st.mdev_available(dev.bdf, t)))
                tx.mkdir(tdir / "devices")
            tx.link(st.sys / "class" / "mdev_bus" / dev.bdf, dev.path)

    def _detach(self, dev: _Dev) -> None:
        st, tx = self.st, self.tx
        name = dev.driver
        assert name is not None
        drv = st.meta["drivers"][name]
        if drv["sriov_configure"] and dev.numvfs:
            # PF drivers disable SR-IOV in their remove().
            self._disable_vfs(dev)
        mdev = st.meta["mdev"].get(dev.bdf)
        if mdev is not None and mdev["driver"] == name:
            # mdev_unregister_parent removes every mdev, then the types.
            for m in [m for m in st.mdevs.values() if m.parent == dev.bdf]:
                self._remove_mdev(m, recount=False)
            tx.rmtree(dev.path / "mdev_supported_types")
            tx.unlink(st.sys / "class" / "mdev_bus" / dev.bdf)
        dev.driver = None
        tx.unlink(dev.path / "driver")
        tx.unlink(st.sys / "bus" / "pci" / "drivers" / name / dev.bdf)
        tx.write(dev.path / "enable", "0\n", MODE_RW)
        if drv["vfio"] and dev.group is not None:
            self._maybe_drop_vfio_node(dev.group)

    def _maybe_drop_vfio_node(self, group: int) -> None:
        """``/dev/vfio/<N>`` goes with the group's last vfio-bound member."""
        still = [
            d
            for d in self.st.group_members(group)
            if d.driver is not None and self.st.meta["drivers"][d.driver]["vfio"]
        ]
        if not still:
            self.tx.unlink(self.st.dev / "vfio" / str(group))

    # -- dynamic ids -----------------------------------------------------------

    def _parse_id(self, max_fields: int) -> PciId:
        fields = self.data.split()
        if len(fields) < 2 or len(fields) > max_fields:
            self.fail(errno.EINVAL, "expected 'VVVV DDDD [SVVV SDDD CCCCCC MMMMMM]'")
        values = [_kstrtoull(f, 16) for f in fields]
        if any(v is None for v in values):
            self.fail(errno.EINVAL)
        nums = [int(v) for v in values if v is not None]
        nums += [0] * (6 - len(nums)) if len(nums) < 6 else []
        any_id = 0xFFFFFFFF  # PCI_ANY_ID
        return PciId(
            None if nums[0] == any_id else nums[0],
            None if nums[1] == any_id else nums[1],
            nums[4],
            nums[5],
        )

    def new_id(self, name: str) -> None:
        pid = self._parse_id(7)
        drv = self.st.meta["drivers"][name]
        existing = [PciId.from_json(i) for i in drv["dynamic_ids"]]
        existing += [i for i in map(PciId.from_json, drv["ids"]) if not i.override_only]
        # new_id_store probes a dummy device with these ids: a match is EEXIST.
        vendor = -1 if pid.vendor is None else pid.vendor
        device = -1 if pid.device is None else pid.device
        if any(i.matches(vendor, device, pid.class_code) for i in existing):
            self.fail(errno.EEXIST, "the driver already matches that id")
        drv["dynamic_ids"].append(pid.to_json())
        self.st.meta_dirty = True
        # pci_add_dynid() then driver_attach(): probe every unbound device.
        for dev in list(self.st.devs.values()):
            if (
                dev.driver is None
                and self.st.matches(dev, name)
                and self.st.probe_error(dev, name) is None
            ):
                self._attach(dev, name)

    def remove_id(self, name: str) -> None:
        pid = self._parse_id(6).to_json()
        drv = self.st.meta["drivers"][name]
        if pid not in drv["dynamic_ids"]:
            self.fail(errno.ENODEV, "no such dynamic id")
        drv["dynamic_ids"].remove(pid)
        self.st.meta_dirty = True

    # -- SR-IOV ----------------------------------------------------------------

    def sriov_numvfs(self, pf: _Dev) -> None:
        st = self.st
        value = _kstrtoull(self.data)
        if value is None:
            self.fail(errno.EINVAL, "not a u16")
        if value > 0xFFFF:
            self.fail(errno.ERANGE, "not a u16")
        geometry = st.meta["sriov"][pf.bdf]
        if value > geometry["total"]:
            self.fail(errno.ERANGE, f"more than sriov_totalvfs={geometry['total']}")
        if value == pf.numvfs:
            return
        if pf.driver is None:
            self.fail(errno.ENOENT, "no driver bound to device; cannot configure SR-IOV")
        if not st.meta["drivers"][pf.driver]["sriov_configure"]:
            self.fail(errno.ENOENT, "driver does not support SR-IOV configuration via sysfs")
        if value == 0:
            self._disable_vfs(pf)
            return
        if pf.numvfs:
            self.fail(
                errno.EBUSY, f"{pf.numvfs} VFs already enabled. Disable before enabling {value} VFs"
            )
        self._enable_vfs(pf, geometry, value)

    def _enable_vfs(self, pf: _Dev, geometry: dict[str, Any], count: int) -> None:
        st, tx = self.st, self.tx
        domain, bus, dev_no, fn = parse_bdf(pf.bdf)
        devfn = dev_no << 3 | fn
        files = {n: _read(pf.path / n) for n in ("subsystem_vendor", "subsystem_device")}
        revision = int(_read(pf.path / "revision"), 16)
        numa = int(_read(pf.path / "numa_node"))
        local_cpus = _read(pf.path / "local_cpus")
        local_cpulist = _read(pf.path / "local_cpulist")
        vf_device = int(geometry["vf_device"])
        vfs: list[_Dev] = []
        for i in range(count):
            rid = devfn + int(geometry["offset"]) + int(geometry["stride"]) * i
            vf_bdf = format_bdf(domain, bus + (rid >> 8), rid & 0xFF)
            if vf_bdf in st.devs:
                self.fail(errno.EEXIST, f"VF address {vf_bdf} is taken")
            path = pf.path.parent / vf_bdf  # VFs are siblings of their PF
            attrs = DeviceAttrs(
                vendor=pf.vendor,
                device=vf_device,
                class_code=pf.class_code,
                subsystem_vendor=int(files["subsystem_vendor"], 16),
                subsystem_device=int(files["subsystem_device"], 16),
                revision=revision,
                numa_node=numa,
                local_cpus=local_cpus,
                local_cpulist=local_cpulist,
                link=VF_LINK,
                reset_methods=("flr",),
            )
            tx.write_files(path, attrs.files())
            node = GroupingNode(
                vf_bdf, pf.node.parent, Role.ENDPOINT, True, False, False, is_vf=True
            )
            vf = _Dev(
                bdf=vf_bdf,
                path=path,
                vendor=pf.vendor,
                device=vf_device,
                class_code=pf.class_code,
                driver=None,
                override=None,
                group=None,
                physfn=pf.bdf,
                numvfs=0,
                autoprobe=True,
                node=node,
                reset_methods=("flr",),
            )
            st.devs[vf_bdf] = vf
            tx.link(path / "physfn", pf.path)
            tx.link(pf.path / f"virtfn{i}", path)
            tx.link(st.sys / "bus" / "pci" / "devices" / vf_bdf, path)
            if st.meta["iommu"]:
                self._join_group(vf)
            vfs.append(vf)
        pf.numvfs = count
        tx.write(pf.path / "sriov_numvfs", f"{count}\n", MODE_RW)
        for vf in vfs:
            self._probe(vf)

    def _join_group(self, dev: _Dev) -> None:
        st, tx = self.st, self.tx
        nodes = {d.bdf: d.node for d in st.devs.values()}
        groups = {d.bdf: d.group for d in st.devs.values() if d.group is not None}
        number = assign_group(dev.node, nodes, groups, st.allocate_group)
        gdir = st.group_dir(number)
        if not tx.exists(gdir / "type"):
            tx.write_files(gdir, group_files(st.meta["iommu_vendor"], st.meta["default_domain"]))
        dev.group = number
        tx.link(gdir / "devices" / dev.bdf, dev.path)
        tx.link(dev.path / "iommu_group", gdir)

    def _leave_group(self, dev: _Dev) -> None:
        st, tx = self.st, self.tx
        if dev.group is None:
            return
        number = dev.group
        dev.group = None
        tx.unlink(st.group_dir(number) / "devices" / dev.bdf)
        others = [d for d in st.group_members(number) if d.bdf != dev.bdf]
        if not others and not any(m.group == number for m in st.mdevs.values()):
            tx.rmtree(st.group_dir(number))
            st.groups.discard(number)

    def _disable_vfs(self, pf: _Dev) -> None:
        st, tx = self.st, self.tx
        vfs = st.vfs_of(pf.bdf)
        for i, vf in reversed(list(enumerate(sorted(vfs, key=lambda d: parse_bdf(d.bdf))))):
            if vf.driver is not None:
                self._detach(vf)
            self._leave_group(vf)
            del st.devs[vf.bdf]
            tx.unlink(st.sys / "bus" / "pci" / "devices" / vf.bdf)
            tx.rmtree(vf.path)
            tx.unlink(pf.path / f"virtfn{i}")
        pf.numvfs = 0
        tx.write(pf.path / "sriov_numvfs", "0\n", MODE_RW)

    def sriov_autoprobe(self, pf: _Dev) -> None:
        value = _kstrtobool(self.data)
        if value is None:
            self.fail(errno.EINVAL, "not a boolean")
        pf.autoprobe = value
        self.tx.write(pf.path / "sriov_drivers_autoprobe", f"{int(value)}\n", MODE_RW)

    # -- mdev ------------------------------------------------------------------

    def mdev_create(self, parent_bdf: str, type_id: str) -> None:
        st, tx = self.st, self.tx
        if len(self.data) not in (36, 37) or not _UUID_RE.match(self.data[:36]):
            self.fail(errno.EINVAL, "not a UUID")
        uuid = self.data[:36].lower()
        if uuid in st.mdevs:
            self.fail(errno.EEXIST, f"mdev {uuid} exists")
        parent = st.devs[parent_bdf]
        info = st.meta["mdev"][parent_bdf]
        tmeta = next(t for t in info["types"] if t["id"] == type_id)
        if st.mdev_available(parent_bdf, tmeta) == 0:
            self.fail(errno.EUSERS, f"no available instance of {type_id}")
        path = parent.path / uuid
        tdir = parent.path / "mdev_supported_types" / type_id
        mdev = _Mdev(uuid, path, parent_bdf, type_id, None)
        st.mdevs[uuid] = mdev
        tx.write(path / "remove", "", MODE_WO)
        tx.link(path / "mdev_type", tdir)
        # An mdev always gets a new single-device group: VFIO registers it
        # with an emulated IOMMU, whether or not the host has a real one.
        number = st.allocate_group()
        mdev.group = number
        gdir = st.group_dir(number)
        tx.write_files(gdir, group_files(st.meta["iommu_vendor"], None))
        tx.link(gdir / "devices" / uuid, path)
        tx.link(path / "iommu_group", gdir)
        tx.link(st.sys / "bus" / "mdev" / "devices" / uuid, path)
        tx.link(tdir / "devices" / uuid, path)
        self._recount(parent_bdf)

    def mdev_remove(self, mdev: _Mdev) -> None:
        value = _kstrtoull(self.data)
        if value is None:
            self.fail(errno.EINVAL, "not a number")
        if value:
            self._remove_mdev(mdev, recount=True)

    def _remove_mdev(self, mdev: _Mdev, *, recount: bool) -> None:
        st, tx = self.st, self.tx
        del st.mdevs[mdev.uuid]
        parent = st.devs[mdev.parent]
        tx.unlink(parent.path / "mdev_supported_types" / mdev.type_id / "devices" / mdev.uuid)
        tx.unlink(st.sys / "bus" / "mdev" / "devices" / mdev.uuid)
        if mdev.group is not None:
            tx.rmtree(st.group_dir(mdev.group))
            st.groups.discard(mdev.group)
        tx.rmtree(mdev.path)
        if recount:
            self._recount(mdev.parent)

    def _recount(self, parent_bdf: str) -> None:
        parent = self.st.devs[parent_bdf]
        for t in self.st.meta["mdev"][parent_bdf]["types"]:
            path = parent.path / "mdev_supported_types" / t["id"] / "available_instances"
            self.tx.write(path, f"{self.st.mdev_available(parent_bdf, t)}\n", MODE_RO)

    # -- other device attributes -------------------------------------------------

    def enable(self, dev: _Dev) -> None:
        value = _kstrtoull(self.data)
        if value is None:
            self.fail(errno.EINVAL)
        if dev.driver is not None:
            self.fail(errno.EBUSY, f"bound to {dev.driver}")
        count = int(_read(dev.path / "enable"))
        if value:
            count += 1
        elif count:
            count = 0
        else:
            self.fail(errno.EIO, "not enabled")
        self.tx.write(dev.path / "enable", f"{count}\n", MODE_RW)

    def numa_node(self, dev: _Dev) -> None:
        value = _kstrtoint(self.data)
        node_dir = self.st.sys / "devices" / "system" / "node"
        online = _read(node_dir / "online")
        if value is None or value < -1 or (value >= 0 and value not in parse_cpulist(online)):
            self.fail(errno.EINVAL, "not an online node")
        if value == -1:
            cpus: set[int] = set()
            for n in parse_cpulist(online):
                cpus |= parse_cpulist(_read(node_dir / f"node{n}" / "cpulist"))
        else:
            cpus = parse_cpulist(_read(node_dir / f"node{value}" / "cpulist"))
        nr = int(self.st.meta["nr_cpu_ids"])
        self.tx.write(dev.path / "numa_node", f"{value}\n", MODE_RW)
        self.tx.write(dev.path / "local_cpus", format_cpumask(cpus, nr) + "\n", MODE_RO)
        self.tx.write(dev.path / "local_cpulist", format_cpulist(cpus) + "\n", MODE_RO)

    def reset(self, dev: _Dev) -> None:
        value = _kstrtoull(self.data)
        if value != 1:
            self.fail(errno.EINVAL)
        path = dev.path / "reset_method"
        if not path.exists() or not _read(path).strip():
            self.fail(errno.ENOTTY, "no reset method")

    def reset_method(self, dev: _Dev) -> None:
        text = _streq(self.data).strip()
        if text == "default":
            methods = list(dev.reset_methods)
        elif not text:
            methods = []
        else:
            methods = text.split()
            if any(m not in dev.reset_methods or m not in _RESET_METHODS for m in methods):
                self.fail(errno.EINVAL, "unsupported reset method")
        self.tx.write(dev.path / "reset_method", " ".join(methods) + "\n", MODE_RW)

    def group_type(self, number: int) -> None:
        value = _streq(self.data)
        if value not in _GROUP_TYPES:
            self.fail(errno.EINVAL, "expected DMA, DMA-FQ, identity or auto")
        if any(d.driver is not None for d in self.st.group_members(number)):
            self.fail(errno.EBUSY, "a device in the group has a driver bound")
        if value == "auto":
            value = str(self.st.meta["default_domain"])
        self.tx.write(self.st.group_dir(number) / "type", f"{value}\n", MODE_RW)

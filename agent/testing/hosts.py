"""Named fake hosts: real topologies (or faithful synthetic ones) as fake sysfs trees.

Each fixture is a function that describes one host to a
:class:`~agent.testing.fakesysfs.FakeSysfs` and builds it. The data are
encoded here, in Python, from the reference material named in each docstring
(the shared reference set beside the project: HW_FACTS.md,
``hosts/*.json``, ``mdev_types.json``); nothing reads those files at run time.
Confidence tags follow HW_FACTS: [C] confirmed, [I] inferred, [S] synthetic.

Use :func:`build` (or ``tessera-agent fakehost build NAME DIR``)::

    hosts.build("virt-2s", tmp_path)
    sysfs = Sysfs(tmp_path, KernelEmulator(tmp_path))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tessera.agent.testing.fakesysfs import FakeSysfs, MdevType, PciId, PciLink, Role
from tessera.agent.testing.nvml import fake_gpu, write_state

_GEN3 = "8.0 GT/s PCIe"
_GEN4 = "16.0 GT/s PCIe"
_GEN5 = "32.0 GT/s PCIe"

#: NVIDIA's GPU driver claims display-class functions of vendor 10de.
_NVIDIA_IDS = [PciId(0x10DE, None, 0x030000, 0xFF0000)]
#: snd_hda_intel claims NVIDIA HD-audio functions by class (0x0403).
_HDA_IDS = [PciId(0x10DE, None, 0x040300, 0xFFFFFF)]
#: mlx5_vfio_pci's one, override-only, entry (drivers/vfio/pci/mlx5/main.c) [C].
_MLX5_VFIO_IDS = [PciId(0x15B3, 0x101E, override_only=True)]
#: qat_vfio_pci: QAT 4xxx-family VFs, override-only [C ids, I semantics].
_QAT_VFIO_IDS = [PciId(0x8086, d, override_only=True) for d in (0x4941, 0x4943, 0x4945)]


def _max_instance(description: str) -> int:
    """``max_instance=N`` of an NVIDIA vGPU type description."""
    return int(description.rsplit("max_instance=", 1)[1])


def _nvidia_types(table: dict[str, tuple[str, str]]) -> list[MdevType]:
    return [
        MdevType(type_id, name, _max_instance(desc), description=desc)
        for type_id, (name, desc) in table.items()
    ]


#: Tesla P4 vGPU types: mdev_types.json ``nvidia_tesla_p4`` (real ``mdevctl
#: types`` dumps, find_string ids 37805747873, 34331405142) [C].
TESLA_P4_TYPES = _nvidia_types(
    {
        "nvidia-157": (
            "GRID P4-2B",
            "num_heads=4, frl_config=45, framebuffer=2048M, max_resolution=5120x2880, "
            "max_instance=4",
        ),
        "nvidia-214": (
            "GRID P4-2B4",
            "num_heads=4, frl_config=45, framebuffer=2048M, max_resolution=5120x2880, "
            "max_instance=4",
        ),
        "nvidia-243": (
            "GRID P4-1B4",
            "num_heads=4, frl_config=45, framebuffer=1024M, max_resolution=5120x2880, "
            "max_instance=8",
        ),
        "nvidia-288": (
            "GRID P4-4C",
            "num_heads=1, frl_config=60, framebuffer=4096M, max_resolution=4096x2400, "
            "max_instance=2",
        ),
        "nvidia-289": (
            "GRID P4-8C",
            "num_heads=1, frl_config=60, framebuffer=8192M, max_resolution=4096x2400, "
            "max_instance=1",
        ),
        "nvidia-63": (
            "GRID P4-1Q",
            "num_heads=4, frl_config=60, framebuffer=1024M, max_resolution=5120x2880, "
            "max_instance=8",
        ),
        "nvidia-64": (
            "GRID P4-2Q",
            "num_heads=4, frl_config=60, framebuffer=2048M, max_resolution=7680x4320, "
            "max_instance=4",
        ),
    }
)

#: Quadro RTX 6000 vGPU types: mdev_types.json ``nvidia_rtx6000`` (find_string
#: ids 13000426850, 35997175007) [C].
RTX6000_TYPES = _nvidia_types(
    {
        "nvidia-256": (
            "GRID RTX6000-1Q",
            "num_heads=4, frl_config=60, framebuffer=1024M, max_resolution=5120x2880, "
            "max_instance=24",
        ),
        "nvidia-257": (
            "GRID RTX6000-2Q",
            "num_heads=4, frl_config=60, framebuffer=2048M, max_resolution=7680x4320, "
            "max_instance=12",
        ),
        "nvidia-258": (
            "GRID RTX6000-3Q",
            "num_heads=4, frl_config=60, framebuffer=3072M, max_resolution=7680x4320, "
            "max_instance=8",
        ),
        "nvidia-259": (
            "GRID RTX6000-4Q",
            "num_heads=4, frl_config=60, framebuffer=4096M, max_resolution=7680x4320, "
            "max_instance=6",
        ),
    }
)


def _two_socket_numa(fs: FakeSysfs, cpus: tuple[str, str], mem_kb: tuple[int, int]) -> None:
    # 2-socket Intel SLIT: 10 local, 21 remote (HW_FACTS §8) [C].
    fs.add_numa_node(0, cpus[0], [10, 21], mem_kb[0])
    fs.add_numa_node(1, cpus[1], [21, 10], mem_kb[1])


def _add_cx6dx(fs: FakeSysfs, bus: int, port: str) -> None:
    """A dual-port ConnectX-6 Dx (15b3:101d, subsystem 15b3:0016) at ``<bus>:00.0/1``.

    PF0 offset 2 / PF1 offset 9, stride 1, 8 VFs each, VF id 101e on
    mlx5_core: HW_FACTS §3 real ConnectX VF layouts [I].
    """
    for fn, offset in ((0, 2), (1, 9)):
        bdf = f"0000:{bus:02x}:00.{fn}"
        fs.add_function(
            bdf,
            parent=port,
            vendor=0x15B3,
            device=0x101D,
            class_code=0x020000,
            subsystem_device=0x0016,
            driver="mlx5_core",
            multifunction=True,
            acs=True,
        )
        fs.add_sriov(bdf, total=8, offset=offset, stride=1, vf_device=0x101E, vf_driver="mlx5_core")


def _add_e810(fs: FakeSysfs, bus: int, port: str) -> None:
    """A dual-port E810-XXV (8086:159b) on ice; VFs 8086:1889 on iavf.

    64 VFs per PF at offsets 16 / 79, stride 1: synthetic totals
    (host_2s_virt_synthetic.json notes) [S].
    """
    for fn, offset in ((0, 16), (1, 79)):
        bdf = f"0000:{bus:02x}:00.{fn}"
        fs.add_function(
            bdf,
            parent=port,
            vendor=0x8086,
            device=0x159B,
            class_code=0x020000,
            driver="ice",
            multifunction=True,
            acs=True,
            link=PciLink(_GEN4, 8, _GEN4, 8),
        )
        fs.add_sriov(bdf, total=64, offset=offset, stride=1, vf_device=0x1889, vf_driver="iavf")


def virt_2s(root: Path) -> None:
    """Synthetic 2-socket virtualization host (Sapphire Rapids class, 2x32C/64T).

    Source: ``hosts/host_2s_virt_synthetic.json`` [S layout, C ids/rules];
    layout and group numbers as in ``sample_tree_virt.txt``. No VF exists at
    build time (every ``sriov_numvfs`` is 0)::

        NUMA 0 (cpus 0-31,64-95)
          pci0000:00 ─ 00:1e.0 PCI bridge (8086:244e, conventional) ─┬ 06:0d.0 e1000 ┐ group 0
                                                                     └ 06:0d.1 e1000 ┘ (+00:1e.0)
          pci0000:30 ─ 30:02.0 RP (ACS, g1) ─┬ 31:00.0 CX-6 Dx PF0 mlx5_core g2, 8 VFs: 31:00.2..
                                             └ 31:00.1 CX-6 Dx PF1 mlx5_core g3, 8 VFs: 31:01.2..
          pci0000:4a ─ 4a:01.0 RP (ACS, g4) ── 4b:00.0 A100 80GB PCIe (10de:20b5) nvidia  g5
          pci0000:6b ─ 6b:00.0 QAT 4xxx RCiEP (8086:4940) 4xxx  g6  SR-IOV 16 (VFs 6b:00.1..)
        NUMA 1 (cpus 32-63,96-127)
          pci0000:b0 ─ b0:02.0 RP (ACS, g7) ── b1:00.0 Tesla P4 (10de:1bb3) nvidia  g8  mdev parent
          pci0000:ca ─ ca:02.0 RP (ACS, g9) ─┬ cb:00.0 E810 PF0 ice  g10  SR-IOV 64
                                             └ cb:00.1 E810 PF1 ice  g11  SR-IOV 64

    Drivers also registered: mlx5_vfio_pci and qat_vfio_pci (override-only
    variant drivers), 4xxxvf, iavf.
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    _two_socket_numa(fs, ("0-31,64-95", "32-63,96-127"), (263785472, 264209408))
    for bus, node in (("00", 0), ("30", 0), ("4a", 0), ("6b", 0), ("b0", 1), ("ca", 1)):
        fs.add_root_bus(f"pci0000:{bus}", node)
    fs.register_driver("e1000", [PciId(0x8086, 0x1076)])
    fs.register_driver("mlx5_core", [PciId(0x15B3, 0x101D), PciId(0x15B3, 0x101E)])
    fs.register_driver("4xxx", [PciId(0x8086, 0x4940)])
    fs.register_driver("4xxxvf", [PciId(0x8086, 0x4941)])
    fs.register_driver("nvidia", _NVIDIA_IDS)
    fs.register_driver("ice", [PciId(0x8086, 0x159B)])
    fs.register_driver("iavf", [PciId(0x8086, 0x1889)])
    fs.register_driver("mlx5_vfio_pci", _MLX5_VFIO_IDS)
    fs.register_driver("qat_vfio_pci", _QAT_VFIO_IDS)
    # The vfio.rst example: a subtractive-decode PCI bridge and the
    # conventional PCI NIC behind it form one group.
    fs.add_function(
        "0000:00:1e.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x244E,
        class_code=0x060401,
        role=Role.PCI_BRIDGE,
        pcie=False,
    )
    for fn in (0, 1):
        fs.add_function(
            f"0000:06:0d.{fn}",
            parent="0000:00:1e.0",
            vendor=0x8086,
            device=0x1076,
            class_code=0x020000,
            driver="e1000",
            pcie=False,
            multifunction=True,
        )
    _root_port(fs, "0000:30:02.0", device=0x347A)
    _add_cx6dx(fs, 0x31, "0000:30:02.0")
    _root_port(fs, "0000:4a:01.0", device=0x352A, link=PciLink(_GEN4, 16, _GEN5, 16))
    fs.add_function(
        "0000:4b:00.0",
        parent="0000:4a:01.0",
        vendor=0x10DE,
        device=0x20B5,
        class_code=0x030200,
        driver="nvidia",
        revision=0xA1,
    )
    fs.add_function(
        "0000:6b:00.0",
        root_bus="pci0000:6b",
        vendor=0x8086,
        device=0x4940,
        class_code=0x0B4000,
        driver="4xxx",
        role=Role.RCIEP,
    )
    fs.add_sriov("0000:6b:00.0", total=16, offset=1, stride=1, vf_device=0x4941, vf_driver="4xxxvf")
    _root_port(fs, "0000:b0:02.0", device=0x347A, link=PciLink(_GEN3, 16, _GEN4, 16))
    fs.add_function(
        "0000:b1:00.0",
        parent="0000:b0:02.0",
        vendor=0x10DE,
        device=0x1BB3,
        class_code=0x030200,
        driver="nvidia",
        link=PciLink(_GEN3, 16, _GEN3, 16),
    )
    fs.add_mdev_parent("0000:b1:00.0", TESLA_P4_TYPES, single_type=True)
    _root_port(fs, "0000:ca:02.0", device=0x347A, link=PciLink(_GEN4, 8, _GEN4, 8))
    _add_e810(fs, 0xCB, "0000:ca:02.0")
    fs.build()
    # NVML's view: the A100 can do MIG (off until someone enables it) [S].
    write_state(
        root,
        [
            fake_gpu("A100-80GB-PCIe", "0000:4b:00.0", seed="virt-2s"),
            fake_gpu("Tesla-P4", "0000:b1:00.0", seed="virt-2s"),
        ],
    )


#: DGX A100 GPU/NIC blocks: (root bus, NUMA node, endpoint buses with kind).
#: GPU BDFs/NUMA [C], compute NIC BDFs from ibp<N>s0 names [I], switch BDFs
#: [S]; host_dgx_a100.json.
_DGX_BLOCKS: tuple[tuple[int, int, tuple[tuple[int, str], ...]], ...] = (
    (0x00, 3, ((0x07, "gpu"), (0x0C, "nic"), (0x0F, "gpu"), (0x12, "nic"))),
    (0x40, 1, ((0x47, "gpu"), (0x4B, "nic"), (0x4E, "gpu"), (0x54, "nic"))),
    (0x80, 7, ((0x87, "gpu"), (0x8D, "nic"), (0x90, "gpu"), (0x94, "nic"))),
    (0xA0, 5, ((0xB7, "gpu"), (0xBA, "nic"), (0xBD, "gpu"), (0xCC, "nic"))),
)
#: Dual-port storage NICs (mlx5_4/5, mlx5_10/11): (root bus, NUMA node) [I/S].
_DGX_STORAGE = ((0x60, 2), (0xE0, 6))


def dgx_a100(root: Path) -> None:
    """NVIDIA DGX A100: 8x A100-SXM4-40GB, 8 compute + 2 dual-port storage ConnectX-6.

    Source: ``hosts/host_dgx_a100.json`` (real ``nvidia-smi topo -m``, GPU BDFs
    and NUMA [C]; NIC BDFs [I]; PEX88096 switch BDFs and id 1000:c010 [S]);
    2x EPYC 7742 in NPS4: node k = CPUs 16k..16k+15,128+16k.., SLIT 10/12/32
    (HW_FACTS §11.3). Every port has ACS, so each endpoint is its own group.
    One of the four identical blocks (NUMA 3; others at 40/NUMA 1, 80/NUMA 7,
    a0/NUMA 5)::

        pci0000:00 ─ 00:01.1 RP ── 01:00.0 USP
            ├ 02:00.0 DSP ─ 05:00.0 USP ─ 06:00.0 DSP ─ 07:00.0 GPU0    (group 5)
            ├ 02:04.0 DSP ─ 0a:00.0 USP ─ 0b:00.0 DSP ─ 0c:00.0 mlx5_0  (group 9)
            ├ 02:08.0 DSP ─ 0d:00.0 USP ─ 0e:00.0 DSP ─ 0f:00.0 GPU1    (group 13)
            └ 02:0c.0 DSP ─ 10:00.0 USP ─ 11:00.0 DSP ─ 12:00.0 mlx5_1  (group 17)
        pci0000:60 ─ 60:01.1 RP ─┬ 61:00.0 storage NIC (NUMA 2)
                                 └ 61:00.1
        pci0000:e0 ─ e0:01.1 RP ─┬ e1:00.0 storage NIC (NUMA 6)
                                 └ e1:00.1

    GPUs: 07, 0f (NUMA 3), 47, 4e (1), 87, 90 (7), b7, bd (5), all ``:00.0``,
    10de:20b0 on nvidia. Compute NICs 15b3:101b (InfiniBand, mlx5_core) at
    0c, 12, 4b, 54, 8d, 94, ba, cc.
    """
    fs = FakeSysfs(root, iommu_vendor="amd")
    for k in range(8):
        distances = [10 if j == k else 12 if j // 4 == k // 4 else 32 for j in range(8)]
        cpus = f"{16 * k}-{16 * k + 15},{128 + 16 * k}-{128 + 16 * k + 15}"
        fs.add_numa_node(k, cpus, distances, 134217728)  # 128 GiB per node [S]
    roots = sorted([(b, n) for b, n, _ in _DGX_BLOCKS] + list(_DGX_STORAGE))
    for bus, node in roots:
        fs.add_root_bus(f"pci0000:{bus:02x}", node)
    fs.register_driver("nvidia", _NVIDIA_IDS)
    fs.register_driver("mlx5_core", [PciId(0x15B3, 0x101B)], sriov_configure=True)
    blocks = {b: legs for b, _, legs in _DGX_BLOCKS}
    for bus, _node in roots:
        rp = f"0000:{bus:02x}:01.1"
        _root_port(fs, rp, device=0x1483, vendor=0x1022)
        if bus not in blocks:
            for fn in (0, 1):
                fs.add_function(
                    f"0000:{bus + 1:02x}:00.{fn}",
                    parent=rp,
                    vendor=0x15B3,
                    device=0x101B,
                    class_code=0x020000,
                    driver="mlx5_core",
                    multifunction=True,
                    acs=True,
                )
            continue
        usp = f"0000:{bus + 1:02x}:00.0"
        _switch_port(fs, usp, rp, Role.SWITCH_UPSTREAM)
        for i, (ep_bus, kind) in enumerate(blocks[bus]):
            dsp = f"0000:{bus + 2:02x}:{4 * i:02x}.0"
            _switch_port(fs, dsp, usp, Role.SWITCH_DOWNSTREAM)
            usp2 = f"0000:{ep_bus - 2:02x}:00.0"
            _switch_port(fs, usp2, dsp, Role.SWITCH_UPSTREAM)
            dsp2 = f"0000:{ep_bus - 1:02x}:00.0"
            _switch_port(fs, dsp2, usp2, Role.SWITCH_DOWNSTREAM)
            if kind == "gpu":
                fs.add_function(
                    f"0000:{ep_bus:02x}:00.0",
                    parent=dsp2,
                    vendor=0x10DE,
                    device=0x20B0,
                    class_code=0x030200,
                    driver="nvidia",
                )
            else:
                fs.add_function(
                    f"0000:{ep_bus:02x}:00.0",
                    parent=dsp2,
                    vendor=0x15B3,
                    device=0x101B,
                    class_code=0x020700,
                    driver="mlx5_core",
                )
    fs.build()
    # NVML's view: 8 A100-SXM4-40GB in bus order, MIG disabled [S].
    write_state(
        root,
        [
            fake_gpu("A100-SXM4-40GB", f"0000:{ep_bus:02x}:00.0", seed="dgx-a100")
            for _root_bus, _node, legs in _DGX_BLOCKS
            for ep_bus, kind in legs
            if kind == "gpu"
        ],
    )


def _root_port(
    fs: FakeSysfs,
    bdf: str,
    *,
    device: int,
    vendor: int = 0x8086,
    acs: bool = True,
    link: PciLink | None = None,
) -> None:
    """A root port on pcieport, directly on the root bus its address names.

    ``0000:b0:02.0`` sits on ``pci0000:b0``: a root port's bus is its root bus.
    """
    fs.add_function(
        bdf,
        root_bus=f"pci{bdf[:7]}",
        vendor=vendor,
        device=device,
        class_code=0x060400,
        driver="pcieport",
        role=Role.ROOT_PORT,
        acs=acs,
        link=link,
    )


def _switch_port(
    fs: FakeSysfs,
    bdf: str,
    parent: str,
    role: Role,
    *,
    vendor: int = 0x1000,
    device: int = 0xC010,
    acs: bool = True,
) -> None:
    """A PCIe switch port on pcieport (DSPs with ACS unless told otherwise)."""
    fs.add_function(
        bdf,
        parent=parent,
        vendor=vendor,
        device=device,
        class_code=0x060400,
        driver="pcieport",
        role=role,
        acs=acs if role is Role.SWITCH_DOWNSTREAM else False,
    )


def gpu_workstation(root: Path) -> None:
    """A workstation without ACS: each GPU shares one group with its HDMI audio.

    Synthetic [S]; GPU id 10de:2230 (RTX A6000) and audio 10de:1aef as given
    by the project; the grouping follows HW_FACTS §5 (a device under a root
    port without ACS joins the port's group; functions of a multifunction
    slot without ACS share a group). 1 NUMA node, CPUs 0-31::

        pci0000:00 ─ 00:00.0 host bridge (8086:3e30)                    group 0
                   ─ 00:01.0 RP (no ACS) ─┬ 01:00.0 RTX A6000 nvidia        ┐ group 1
                                          └ 01:00.1 HDMI audio snd_hda_intel┘ (+00:01.0)
                   ─ 00:02.0 RP (no ACS) ─┬ 02:00.0 RTX A6000 nvidia        ┐ group 2
                                          └ 02:00.1 HDMI audio snd_hda_intel┘ (+00:02.0)

    Passing a GPU through means binding both endpoints of its group to
    vfio-pci; the root port stays on pcieport (driver_managed_dma).
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    fs.add_numa_node(0, "0-31", [10], 131_072_000)
    fs.add_root_bus("pci0000:00", 0)
    fs.register_driver("nvidia", _NVIDIA_IDS)
    fs.register_driver("snd_hda_intel", _HDA_IDS)
    fs.add_function(
        "0000:00:00.0",
        root_bus="pci0000:00",
        vendor=0x8086,
        device=0x3E30,
        class_code=0x060000,
        role=Role.RCIEP,
        pcie=False,
        reset_methods=(),
    )
    for n in (1, 2):
        port = f"0000:00:0{n}.0"
        _root_port(fs, port, device=0x1901, acs=False)
        fs.add_function(
            f"0000:0{n}:00.0",
            parent=port,
            vendor=0x10DE,
            device=0x2230,
            class_code=0x030000,
            subsystem_device=0x1459,
            driver="nvidia",
            multifunction=True,
            revision=0xA1,
        )
        fs.add_function(
            f"0000:0{n}:00.1",
            parent=port,
            vendor=0x10DE,
            device=0x1AEF,
            class_code=0x040300,
            subsystem_device=0x1459,
            driver="snd_hda_intel",
            multifunction=True,
            revision=0xA1,
        )
    fs.build()
    # NVML's view: two RTX A6000, which cannot do MIG.
    write_state(
        root,
        [fake_gpu("RTX-A6000", f"0000:{b:02x}:00.0", seed="gpu-workstation") for b in (1, 2)],
    )


#: HGX H100 (Quanta C2789) GPU root buses: socket 0 from the real map's
#: ``pci0000:04`` GPU0 path and its root-bus list (HW_FACTS §4) [C/I];
#: socket 1 choice [S].
_HGX_ROOTS = (
    (0x04, 0),
    (0x0B, 0),
    (0x12, 0),
    (0x19, 0),
    (0x97, 1),
    (0xA7, 1),
    (0xB7, 1),
    (0xC7, 1),
)


def hgx_8gpu(root: Path) -> None:
    """HGX H100 8-GPU (Quanta C2789 layout): each GPU shares a switch with its NIC.

    Source: HW_FACTS §4, the C2789 GPU0 path ``pci0000:04/04:01.0/05:00.0/
    06:02.0/08:00.0/09:00.0/0a:00.0`` and its NIC ``.../05:00.0/06:00.0/07:00.0``
    [C]; the same block repeated on 8 root buses [S], 2 NUMA nodes of 2x56C
    (the 224-CPU example of HW_FACTS §1) [S]. Every DSP has ACS (HW_FACTS
    §12.5 assumption), so each GPU and NIC is its own group. One block::

        pci0000:04 ─ 04:01.0 RP (8086:352a) ── 05:00.0 CX-7 switch USP (15b3:1979)
                       ├ 06:00.0 DSP ── 07:00.0 CX-7 NIC (15b3:1021, mlx5_core)
                       └ 06:02.0 DSP ── 08:00.0 USP (1000:c030) ── 09:00.0 DSP
                                          ── 0a:00.0 H100 SXM5 (10de:2330)

    GPUs at 0a, 11, 18, 1f (NUMA 0) and 9d, ad, bd, cd (NUMA 1), ``:00.0``;
    NICs at 07, 0e, 15, 1c, 9a, aa, ba, ca.
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    _two_socket_numa(fs, ("0-55,112-167", "56-111,168-223"), (528_000_000, 528_000_000))
    fs.register_driver("nvidia", _NVIDIA_IDS)
    fs.register_driver("mlx5_core", [PciId(0x15B3, 0x1021), PciId(0x15B3, 0x101E)])
    for bus, node in _HGX_ROOTS:
        fs.add_root_bus(f"pci0000:{bus:02x}", node)
    gen5 = PciLink(_GEN5, 16, _GEN5, 16)
    for bus, _node in _HGX_ROOTS:
        rp = f"0000:{bus:02x}:01.0"
        _root_port(fs, rp, device=0x352A, link=gen5)
        usp = f"0000:{bus + 1:02x}:00.0"
        _switch_port(fs, usp, rp, Role.SWITCH_UPSTREAM, vendor=0x15B3, device=0x1979)
        dsp_nic = f"0000:{bus + 2:02x}:00.0"
        dsp_gpu = f"0000:{bus + 2:02x}:02.0"
        _switch_port(fs, dsp_nic, usp, Role.SWITCH_DOWNSTREAM, vendor=0x15B3, device=0x1979)
        fs.add_function(
            f"0000:{bus + 3:02x}:00.0",
            parent=dsp_nic,
            vendor=0x15B3,
            device=0x1021,
            class_code=0x020700,
            driver="mlx5_core",
            link=gen5,
        )
        fs.add_sriov(
            f"0000:{bus + 3:02x}:00.0",
            total=8,
            offset=2,
            stride=1,
            vf_device=0x101E,
            vf_driver="mlx5_core",
        )
        _switch_port(fs, dsp_gpu, usp, Role.SWITCH_DOWNSTREAM, vendor=0x15B3, device=0x1979)
        usp2 = f"0000:{bus + 4:02x}:00.0"
        _switch_port(fs, usp2, dsp_gpu, Role.SWITCH_UPSTREAM, device=0xC030)
        dsp2 = f"0000:{bus + 5:02x}:00.0"
        _switch_port(fs, dsp2, usp2, Role.SWITCH_DOWNSTREAM, device=0xC030)
        fs.add_function(
            f"0000:{bus + 6:02x}:00.0",
            parent=dsp2,
            vendor=0x10DE,
            device=0x2330,
            class_code=0x030200,
            driver="nvidia",
            link=gen5,
            revision=0xA1,
        )
    fs.register_driver("mlx5_vfio_pci", _MLX5_VFIO_IDS)
    fs.build()
    # NVML's view: 8 H100 80GB HBM3, MIG disabled [S].
    write_state(
        root,
        [
            fake_gpu("H100-80GB-HBM3", f"0000:{bus + 6:02x}:00.0", seed="hgx-8gpu")
            for bus, _node in _HGX_ROOTS
        ],
    )


#: PCIe A100 host: (root bus, NUMA node) of each GPU's root port [S].
_PCIE_A100_ROOTS = ((0x17, 0), (0x31, 0), (0x98, 1), (0xB1, 1))


def pcie_a100_mig(root: Path) -> None:
    """A 2-socket PCIe GPU server: 4x A100 80GB PCIe (MIG-capable) and a ConnectX-6 Dx.

    Synthetic layout [S] in the style of ``virt-2s`` (Sapphire Rapids class,
    2x32C/64T, 2-socket SLIT 10/21, HW_FACTS §8); the GPU is the one
    ``hosts/host_2s_virt_synthetic.json`` names (10de:20b5, nvidia, MIG
    profiles of mig_profiles.json ``A100-80GB`` [C]). Each GPU sits alone
    under its own ACS root port, two per socket, so each is its own IOMMU
    group; there is no PCIe switch, so no GPU shares one with the NIC::

        NUMA 0 ─ pci0000:17 ─ 17:01.0 RP ── 18:00.0 A100 80GB PCIe
               ─ pci0000:31 ─ 31:01.0 RP ── 32:00.0 A100 80GB PCIe
               ─ pci0000:4a ─ 4a:02.0 RP ─┬ 4b:00.0 CX-6 Dx PF0 mlx5_core, 8 VFs
                                          └ 4b:00.1 CX-6 Dx PF1 mlx5_core, 8 VFs
        NUMA 1 ─ pci0000:98 ─ 98:01.0 RP ── 99:00.0 A100 80GB PCIe
               ─ pci0000:b1 ─ b1:01.0 RP ── b2:00.0 A100 80GB PCIe

    MIG is off at boot (NVML's view); an operator switches it on per GPU.
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    _two_socket_numa(fs, ("0-31,64-95", "32-63,96-127"), (263785472, 264209408))
    for bus, node in (*_PCIE_A100_ROOTS, (0x4A, 0)):
        fs.add_root_bus(f"pci0000:{bus:02x}", node)
    fs.register_driver("nvidia", _NVIDIA_IDS)
    fs.register_driver("mlx5_core", [PciId(0x15B3, 0x101D), PciId(0x15B3, 0x101E)])
    fs.register_driver("mlx5_vfio_pci", _MLX5_VFIO_IDS)
    gpus: list[str] = []
    for bus, _node in _PCIE_A100_ROOTS:
        rp = f"0000:{bus:02x}:01.0"
        _root_port(fs, rp, device=0x352A, link=PciLink(_GEN4, 16, _GEN5, 16))
        address = f"0000:{bus + 1:02x}:00.0"
        fs.add_function(
            address,
            parent=rp,
            vendor=0x10DE,
            device=0x20B5,
            class_code=0x030200,
            driver="nvidia",
            revision=0xA1,
            link=PciLink(_GEN4, 16, _GEN4, 16),
        )
        gpus.append(address)
    _root_port(fs, "0000:4a:02.0", device=0x347A)
    _add_cx6dx(fs, 0x4B, "0000:4a:02.0")
    fs.build()
    # NVML's view: 4 A100 80GB PCIe, MIG disabled until an operator enables it [S].
    write_state(root, [fake_gpu("A100-80GB-PCIe", a, seed="pcie-a100-mig") for a in gpus])


def noacs_switch(root: Path) -> None:
    """Two GPUs behind a PLX switch under a root port without ACS: one shared group.

    Synthetic [S] (consumer board with a PEX 8747, 10b5:8747; Tesla T4
    10de:1eb8); grouping per HW_FACTS §5: neither the root port nor the
    switch's downstream ports isolate, so the port, the switch and both GPUs
    form one group. A second root port with ACS holds a NIC on its own::

        pci0000:00 ─ 00:01.0 RP (no ACS) ── 01:00.0 USP                           ┐
                       ├ 02:08.0 DSP (no ACS) ─ 03:00.0 T4 nvidia              │ group 0
                       └ 02:10.0 DSP (no ACS) ─ 04:00.0 T4 nvidia              ┘
                   ─ 00:02.0 RP (ACS, group 1) ── 05:00.0 CX-5 (15b3:1017) mlx5_core  group 2
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    fs.add_numa_node(0, "0-15", [10], 65_536_000)
    fs.add_root_bus("pci0000:00", 0)
    fs.register_driver("nvidia", _NVIDIA_IDS)
    fs.register_driver("mlx5_core", [PciId(0x15B3, 0x1017)], sriov_configure=True)
    gen3 = PciLink(_GEN3, 16, _GEN3, 16)
    _root_port(fs, "0000:00:01.0", device=0x1901, acs=False, link=gen3)
    _switch_port(fs, "0000:01:00.0", "0000:00:01.0", Role.SWITCH_UPSTREAM, vendor=0x10B5,
                 device=0x8747)  # fmt: skip
    for dsp, bus in (("0000:02:08.0", 3), ("0000:02:10.0", 4)):
        _switch_port(fs, dsp, "0000:01:00.0", Role.SWITCH_DOWNSTREAM, vendor=0x10B5,
                     device=0x8747, acs=False)  # fmt: skip
        fs.add_function(
            f"0000:{bus:02x}:00.0",
            parent=dsp,
            vendor=0x10DE,
            device=0x1EB8,
            class_code=0x030200,
            driver="nvidia",
            link=gen3,
        )
    _root_port(fs, "0000:00:02.0", device=0x1905, link=PciLink(_GEN3, 8, _GEN3, 8))
    fs.add_function(
        "0000:05:00.0",
        parent="0000:00:02.0",
        vendor=0x15B3,
        device=0x1017,
        class_code=0x020000,
        driver="mlx5_core",
        link=PciLink(_GEN3, 8, _GEN3, 8),
    )
    fs.build()


def vgpu(root: Path) -> None:
    """An mdev (time-sliced vGPU) host: a Tesla P4 and a Quadro RTX 6000.

    Types: mdev_types.json ``nvidia_tesla_p4`` and ``nvidia_rtx6000`` [C];
    both GPUs are pre-Ampere, so one type per GPU at a time [I]. Layout [S]
    (Skylake-SP style root buses), 1 NUMA node per socket::

        NUMA 0: pci0000:3a ─ 3a:00.0 RP (ACS, g0) ── 3b:00.0 Tesla P4 (10de:1bb3) nvidia  g1
        NUMA 1: pci0000:d7 ─ d7:00.0 RP (ACS, g2) ── d8:00.0 Quadro RTX 6000 (10de:1e30) nvidia  g3

    Each mdev created gets the next free group number (4, 5, ...).
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    _two_socket_numa(fs, ("0-19,40-59", "20-39,60-79"), (196_608_000, 196_608_000))
    fs.register_driver("nvidia", _NVIDIA_IDS)
    for rb, node, gpu, types in (
        (0x3A, 0, (0x1BB3, 0x030200, PciLink(_GEN3, 16, _GEN3, 16)), TESLA_P4_TYPES),
        (0xD7, 1, (0x1E30, 0x030000, PciLink(_GEN3, 16, _GEN3, 16)), RTX6000_TYPES),
    ):
        fs.add_root_bus(f"pci0000:{rb:02x}", node)
        port = f"0000:{rb:02x}:00.0"
        _root_port(fs, port, device=0x2030, link=gpu[2])
        bdf = f"0000:{rb + 1:02x}:00.0"
        fs.add_function(
            bdf,
            parent=port,
            vendor=0x10DE,
            device=gpu[0],
            class_code=gpu[1],
            driver="nvidia",
            link=gpu[2],
        )
        fs.add_mdev_parent(bdf, types, single_type=True)
    fs.build()


def sriov_nic(root: Path) -> None:
    """SR-IOV NICs only: a ConnectX-6 Dx and an E810, both dual-port.

    The NICs of ``host_2s_virt_synthetic.json`` [S layout, C/I geometry] on
    one socket; no VF exists at build time. mlx5_vfio_pci is registered
    (override-only, 101e VFs) for migratable VF tests::

        pci0000:30 ─ 30:02.0 RP (ACS, g0) ─┬ 31:00.0 CX-6 Dx PF0 mlx5_core g1, VFs 31:00.2-31:01.1
                                           └ 31:00.1 CX-6 Dx PF1 mlx5_core g2, VFs 31:01.2-31:02.1
        pci0000:ca ─ ca:02.0 RP (ACS, g3) ─┬ cb:00.0 E810 PF0 ice g4  64 VFs from cb:02.0 (iavf)
                                           └ cb:00.1 E810 PF1 ice g5  64 VFs from cb:0a.0
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    fs.add_numa_node(0, "0-31,64-95", [10], 263785472)
    fs.add_root_bus("pci0000:30", 0)
    fs.add_root_bus("pci0000:ca", 0)
    fs.register_driver("mlx5_core", [PciId(0x15B3, 0x101D), PciId(0x15B3, 0x101E)])
    fs.register_driver("ice", [PciId(0x8086, 0x159B)])
    fs.register_driver("iavf", [PciId(0x8086, 0x1889)])
    fs.register_driver("mlx5_vfio_pci", _MLX5_VFIO_IDS)
    for rb, link in ((0x30, PciLink()), (0xCA, PciLink(_GEN4, 8, _GEN4, 8))):
        _root_port(fs, f"0000:{rb:02x}:02.0", device=0x347A, link=link)
        if rb == 0x30:
            _add_cx6dx(fs, 0x31, "0000:30:02.0")
        else:
            _add_e810(fs, 0xCB, "0000:ca:02.0")
    fs.build()


def sriov_large(root: Path) -> None:
    """A 2-socket host with two dual-port E810s: 262 PCI functions with every VF on.

    The E810 geometry of :func:`sriov_nic` (synthetic totals [S]) once per
    socket, for discovery at scale (the benchmark enables all 256 VFs)::

        pci0000:30 (node 0) ─ 30:02.0 RP (ACS) ─┬ 31:00.0 E810 PF0 ice  64 VFs
                                                 └ 31:00.1 E810 PF1 ice  64 VFs
        pci0000:b0 (node 1) ─ b0:02.0 RP (ACS) ─┬ b1:00.0 E810 PF0 ice  64 VFs
                                                 └ b1:00.1 E810 PF1 ice  64 VFs
    """
    fs = FakeSysfs(root, iommu_vendor="intel")
    _two_socket_numa(fs, ("0-31", "32-63"), (263785472, 264209408))
    fs.register_driver("ice", [PciId(0x8086, 0x159B)])
    fs.register_driver("iavf", [PciId(0x8086, 0x1889)])
    for node, rb in ((0, 0x30), (1, 0xB0)):
        port = f"0000:{rb:02x}:02.0"
        fs.add_root_bus(f"pci0000:{rb:02x}", node)
        _root_port(fs, port, device=0x347A, link=PciLink(_GEN4, 8, _GEN4, 8))
        _add_e810(fs, rb + 1, port)
    fs.build()


def no_iommu(root: Path) -> None:
    """A host with the IOMMU off: no groups, so nothing can be passed through.

    Synthetic [S]: one socket, a GPU and a NIC under root ports. No
    ``/sys/kernel/iommu_groups`` and no ``iommu_group`` links (HW_FACTS §5);
    binding vfio-pci fails with EINVAL::

        pci0000:00 ─ 00:01.0 RP ── 01:00.0 A100 80GB PCIe (10de:20b5) nvidia
                   ─ 00:02.0 RP ── 02:00.0 ConnectX-6 Dx (15b3:101d) mlx5_core
    """
    fs = FakeSysfs(root)
    fs.no_iommu()
    fs.add_numa_node(0, "0-31", [10], 131_072_000)
    fs.add_root_bus("pci0000:00", 0)
    fs.register_driver("nvidia", _NVIDIA_IDS)
    fs.register_driver("mlx5_core", [PciId(0x15B3, 0x101D)], sriov_configure=True)
    for n, (vendor, device, cls, drv) in enumerate(
        ((0x10DE, 0x20B5, 0x030200, "nvidia"), (0x15B3, 0x101D, 0x020000, "mlx5_core")), start=1
    ):
        port = f"0000:00:0{n}.0"
        _root_port(fs, port, device=0x347A)
        fs.add_function(
            f"0000:0{n}:00.0", parent=port, vendor=vendor, device=device, class_code=cls, driver=drv
        )
    fs.build()


@dataclass(frozen=True)
class FixtureHost:
    """A named fake host.

    Attributes:
        name: registry key (``virt-2s``).
        summary: one line for listings.
        build: writes the tree under the given root.
    """

    name: str
    summary: str
    build: Callable[[Path], None]


_HOSTS = (
    FixtureHost("virt-2s", "2S virtualization host: SR-IOV NICs, QAT, A100, P4 vGPU", virt_2s),
    FixtureHost("dgx-a100", "DGX A100: 8 A100-SXM4 behind switches, 8 NUMA nodes", dgx_a100),
    FixtureHost("gpu-workstation", "2 GPUs, each grouped with its HDMI audio", gpu_workstation),
    FixtureHost("hgx-8gpu", "HGX H100: 8 GPUs, each sharing a switch with its NIC", hgx_8gpu),
    FixtureHost(
        "pcie-a100-mig", "4 A100 80GB PCIe (MIG-capable), 2 sockets, CX-6 Dx", pcie_a100_mig
    ),
    FixtureHost("noacs-switch", "2 GPUs behind a switch without ACS: one group", noacs_switch),
    FixtureHost("vgpu", "mdev vGPU host: Tesla P4 + Quadro RTX 6000", vgpu),
    FixtureHost("sriov-nic", "ConnectX-6 Dx + E810 SR-IOV PFs", sriov_nic),
    FixtureHost("sriov-large", "2 dual-port E810s: 262 functions with all VFs on", sriov_large),
    FixtureHost("no-iommu", "IOMMU off: no groups", no_iommu),
)

#: Fixture name -> builder taking the root directory.
FIXTURE_HOSTS: dict[str, Callable[[Path], None]] = {h.name: h.build for h in _HOSTS}

#: Fixture name -> its description.
FIXTURES: dict[str, FixtureHost] = {h.name: h for h in _HOSTS}


def build(name: str, root: Path) -> None:
    """Build the fixture host ``name`` under ``root``.

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    try:
        builder = FIXTURE_HOSTS[name]
    except KeyError:
        raise KeyError(
            f"unknown fixture host {name!r}; known: {', '.join(sorted(FIXTURE_HOSTS))}"
        ) from None
    builder(root)

"""Host probes: one module per kernel subsystem, each reading sysfs only.

``pci`` (functions), ``pcie`` (tree, roles, locality), ``iommu`` (groups),
``numa``, ``sriov``, ``mdev``, ``vfio`` (bindings, device nodes) and
``migration`` (VFIO live-migration drivers). Every probe takes an
:class:`agent.sysfs.Sysfs` and returns frozen dataclasses; none writes.
"""

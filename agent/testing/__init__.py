"""Fake hosts for tests and demos: a fake sysfs builder, a kernel emulator and fixtures.

* :mod:`agent.testing.fakesysfs`: :class:`FakeSysfs` lays out a ``/sys`` tree.
* :mod:`agent.testing.kernel`: :class:`KernelEmulator` performs sysfs writes
  on such a tree with Linux's effects and errno (an ``agent.sysfs.SysfsWriter``).
* :mod:`agent.testing.hosts`: named fixture hosts (``virt-2s``, ``dgx-a100``,
  ``gpu-workstation``, ...).

Nothing here is used on a real host: the agent only loads the emulator with
``--fake-kernel``, and only on a tree that carries the fake-host marker.
"""

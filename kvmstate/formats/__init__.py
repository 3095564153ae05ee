"""Readers and writers for the containers other VMMs keep vCPU state in.

Each module opens one VMM's format by field name and rebuilds the state in
the kernel's own structures (:class:`~kvmstate.nested.NestedState`,
:class:`~kvmstate.state.VcpuState`), saying what the VMM did not keep:

* :mod:`kvmstate.formats.qemu` - QEMU migration streams (``QEVM``).
"""

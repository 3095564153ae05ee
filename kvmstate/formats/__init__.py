"""Readers and writers of the files other VMMs save (QEMU, Cloud Hypervisor, crosvm)."""

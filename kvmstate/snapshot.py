"""The KVMSTATE file and its JSON form: now :mod:`kvmstate.formats.native`, re-exported.

Every name this module had is the same object here; new code may import
either. (A re-export, not a deprecation: the name is in docs and scripts,
and costs nothing to keep.)

>>> from kvmstate.snapshot import dumps_vcpu, loads_vcpu   # doctest: +SKIP
"""

from __future__ import annotations

from kvmstate.formats import native

# The same objects, under the old module name.
FORMAT_MAJOR = native.FORMAT_MAJOR
FORMAT_MINOR = native.FORMAT_MINOR
MAGIC = native.MAGIC
dumps_vcpu = native.dumps_vcpu
dumps_vm = native.dumps_vm
from_dict = native.from_dict
loads_vcpu = native.loads_vcpu
loads_vm = native.loads_vm
to_dict = native.to_dict

__all__ = native.__all__

"""kvmstate: read, save, restore, check and explore KVM vCPU state from Python.

Nested virtualization state (``KVM_GET_NESTED_STATE`` /
``KVM_SET_NESTED_STATE``) first. Layers, each importing only those below:

* :mod:`kvmstate.uapi` - byte-exact mirrors of the kernel's structures;
* :mod:`kvmstate.ioctls` - ioctl numbers computed from the mirrors;
* :mod:`kvmstate.nested` - :class:`NestedState`, nested state in an aligned buffer;
* :mod:`kvmstate.system`, :mod:`kvmstate.vm`, :mod:`kvmstate.vcpu` - the
  ``/dev/kvm``, VM and vCPU file descriptors (:class:`Kvm`, :class:`Vm`, :class:`Vcpu`);
* :mod:`kvmstate.cli` - the ``kvmstate`` command.
"""

from kvmstate.errors import (
    KvmError,
    NestedStateRejectedError,
    NestedStateTooLargeError,
    NestedStateUnavailableError,
    StateError,
    UnsupportedKvmError,
)
from kvmstate.nested import NestedState
from kvmstate.system import Kvm
from kvmstate.uapi import NestedFlag, NestedFormat
from kvmstate.vcpu import Vcpu
from kvmstate.vm import Vm

__version__ = "0.1.0.dev0"

__all__ = [
    "Kvm",
    "KvmError",
    "NestedFlag",
    "NestedFormat",
    "NestedState",
    "NestedStateRejectedError",
    "NestedStateTooLargeError",
    "NestedStateUnavailableError",
    "StateError",
    "UnsupportedKvmError",
    "Vcpu",
    "Vm",
    "__version__",
]

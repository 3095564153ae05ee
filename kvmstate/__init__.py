"""kvmstate: read, save, restore, check and explore KVM vCPU state from Python.

Nested virtualization state (``KVM_GET_NESTED_STATE`` /
``KVM_SET_NESTED_STATE``) first. Layers, highest first; a module imports
only modules of the layers below its own (``tests/test_architecture.py``
reads the imports and holds the package to this list):

* ``kvmstate.__main__`` - ``python -m kvmstate``;
* ``kvmstate.cli`` - the ``kvmstate`` command;
* ``kvmstate`` - this package: the names most callers need;
* ``kvmstate.diff`` - field-by-field comparison of two states;
* ``kvmstate.describe``, ``kvmstate.snapshot`` - fields as text and JSON; the old name of
  the native format;
* ``kvmstate.formats.native``, ``kvmstate.formats.qemu``, ``kvmstate.formats.cloud_hypervisor``,
  ``kvmstate.formats.crosvm`` - files: kvmstate's own, and other VMMs';
* ``kvmstate.formats._qemu_stream``, ``kvmstate.formats.cbor``, ``kvmstate.formats._fields``,
  ``kvmstate.formats`` - the encodings those files use, and checked access to their values;
* ``kvmstate.system`` - ``/dev/kvm`` (:class:`Kvm`), which hands its answers down to ...
* ``kvmstate.vm`` - a VM (:class:`Vm`), which hands them down to ...
* ``kvmstate.vcpu`` - a vCPU (:class:`Vcpu`);
* ``kvmstate.vmstate`` - whole-VM save, restore and file (:class:`~kvmstate.vmstate.VmState`),
  called by the VM with itself;
* ``kvmstate.save`` - whole-vCPU save and restore, in the order nested state needs;
* ``kvmstate.preflight`` - what a target vCPU would refuse, found before a restore writes;
* ``kvmstate.check`` - why ``KVM_SET_NESTED_STATE`` would refuse a state, joining ...
* ``kvmstate.check.vmx``, ``kvmstate.check.vmx_state``, ``kvmstate.check.svm`` - the
  vendors' rules;
* ``kvmstate.check.generic``, ``kvmstate.check.registers`` - the rules every state meets,
  and the register checks both vendors share;
* ``kvmstate.check.engine`` - the context, scopes and loop the rules run in;
* ``kvmstate.check.facts``, ``kvmstate.check.problem``, ``kvmstate.check.memory`` - what
  is known of the target, what a broken rule reports, the target's guest memory;
* ``kvmstate.state`` - :class:`~kvmstate.state.VcpuState` and its table of parts;
* ``kvmstate.nested`` - :class:`NestedState`, nested state in an aligned buffer;
* ``kvmstate._fd`` - the file descriptor base and the only two paths into the kernel;
* ``kvmstate.ioctls`` - ioctl numbers computed from the mirrors;
* ``kvmstate.vmcb``, ``kvmstate.vmcs12`` - the VMCB and vmcs12 mirrors;
* ``kvmstate.uapi`` - byte-exact mirrors of ``<linux/kvm.h>``, with its constants and enums;
* ``kvmstate.uapi_enums`` - those enums, which ``kvmstate.uapi`` imports on first use;
* ``kvmstate.errors``, ``kvmstate._struct``, ``kvmstate.x86``, ``kvmstate.records``,
  ``kvmstate.uapi_constants`` - the exception tree, the mirror base, architectural bits,
  the file container, the UAPI's integer constants;
* ``kvmstate._codec`` - the mirror base's generated ``to_dict``/``from_dict``.

The wrappers sit above the state, the rules and save/restore because those
take a vCPU as an argument and never import one: a vCPU calls down into
them (``save_state``, the explanation of a refused ``KVM_SET_NESTED_STATE``).
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

"""kvmstate: KVM vCPU and nested virtualization state from Python."""

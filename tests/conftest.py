"""Shared test plumbing: /dev/kvm fixtures and the emulated-guest plugin."""

import importlib.util

pytest_plugins = ["tests.kvm_fixtures"]
if importlib.util.find_spec("tests.guest") and importlib.util.find_spec("tests.guest.pytest_guest"):
    pytest_plugins.append("tests.guest.pytest_guest")

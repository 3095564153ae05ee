"""Test-side machinery shared by the guest tests (L1 programs, migration)."""

"""On-demand benchmarks (not part of the test suite): see each script\x27s docstring."""

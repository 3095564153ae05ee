"""The emulated test guests (tests/guest/run) and their pytest plugin."""

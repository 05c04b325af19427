"""Helpers shared by several test modules: CLI invocation, generated datasets (no fakes: see tests/fakes)."""

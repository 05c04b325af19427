"""Helpers shared by several test modules: CLI invocation, generated datasets, a running server
(support.serve) (no fakes: see tests/fakes)."""

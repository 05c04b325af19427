"""Shared fixtures: the bundled sample model and data, and tiny generated checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.cli import SAMPLE_MODEL


@pytest.fixture(scope="session")
def sample_model() -> Path:
    """The committed CIFAR ResNet-20 trained on the sample digits (with its sidecar card)."""
    return SAMPLE_MODEL


@pytest.fixture(scope="session")
def sample_test():
    from toolkit.data import load_sample

    return load_sample("test")


@pytest.fixture(scope="session")
def sample_card(sample_model):
    from toolkit.card import load_sidecar

    return load_sidecar(sample_model)

"""Shared configuration: the hypothesis profile, every strategy as a fixture, torch helpers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from .helpers import STRATEGIES, StrategyConfig

settings.register_profile(
    "normstats",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("normstats")


@pytest.fixture(params=STRATEGIES, ids=lambda s: s.id)
def estimator_factory(request: pytest.FixtureRequest) -> StrategyConfig:
    """Every exported strategy (EMA also with ``debias=True``); call it to build one."""
    return request.param


@pytest.fixture
def torch() -> Any:
    """The torch module; the test is skipped where torch is not installed."""
    return pytest.importorskip("torch")


def _torch_devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["cpu"]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``torch_device``: every device torch offers here (cpu, and cuda where there is one)."""
    if "torch_device" in metafunc.fixturenames:
        metafunc.parametrize("torch_device", _torch_devices())

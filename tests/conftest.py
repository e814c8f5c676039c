"""Shared configuration: the hypothesis profile, every strategy as a fixture, torch helpers,
and the check that the run loaded every module of the package under one name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from .helpers import STRATEGIES, StrategyConfig
from .module_names import loaded_twice

settings.register_profile(
    "normstats",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("normstats")


@pytest.fixture(scope="session", autouse=True)
def one_name_per_module() -> Iterator[None]:
    """After the last test: no file of the package was loaded under two module names by
    anything the suite imported or collected (a failure here errors the last test)."""
    yield
    twice = loaded_twice()
    assert not twice, "modules loaded under two names:\n" + "\n".join(twice)


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

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from meltguard.clock import SystemClock

if TYPE_CHECKING:
    from meltguard.inference.diffusers_engine import DiffusersEngine


@pytest.fixture(scope="session")
def tiny_pipeline() -> Any:
    """Built once per session: the engines under test share it through their factory seam."""
    import torch

    from meltguard.inference.diffusers_engine import on_device
    from meltguard.inference.tiny import build_tiny_pipeline

    return on_device("tiny", build_tiny_pipeline(), "cpu", torch.float32)


@pytest.fixture
async def tiny_engine(tiny_pipeline: Any) -> AsyncIterator[DiffusersEngine]:
    from meltguard.inference.diffusers_engine import DiffusersEngine

    engine = DiffusersEngine(
        "tiny",
        lambda _device, _dtype: tiny_pipeline,
        max_batch=4,
        clock=SystemClock(),
        device="cpu",
    )
    yield engine
    await engine.close()

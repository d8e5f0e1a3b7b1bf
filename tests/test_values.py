"""fast_init: a frozen dataclass built faster is still the same frozen dataclass."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from meltguard.admission.cost import ImageAsk
from meltguard.admission.events import Decided
from meltguard.admission.policy import Level
from meltguard.values import GenerationJob, QuotaOutcome, QuotaWindow, Size, WindowState, fast_init


@fast_init
@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 2
    label: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SlowPoint:
    x: int
    y: int = 2
    label: str | None = None


def test_fields_defaults_and_keywords_are_set_as_the_generated_init_sets_them() -> None:
    for args, kwargs in (((1,), {}), ((1, 5), {}), ((1,), {"label": "a"}),
                         ((), {"x": 3, "y": 4, "label": None})):
        fast, slow = Point(*args, **kwargs), SlowPoint(*args, **kwargs)
        assert (fast.x, fast.y, fast.label) == (slow.x, slow.y, slow.label)
        assert repr(fast) == repr(slow).replace("SlowPoint", "Point")
    assert Point(1) == Point(1, 2, None) and hash(Point(1)) == hash(Point(1, 2))
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, 2, "a", 4)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=3)  # type: ignore[call-arg]


def test_still_frozen_replaceable_and_picklable() -> None:
    point = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.x = 5  # type: ignore[misc]
    assert dataclasses.replace(point, y=7) == Point(1, 7)
    assert pickle.loads(pickle.dumps(point)) == point


def test_classes_it_cannot_build_are_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Factory:
        items: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        x: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    for cls in (Factory, PostInit, NoSlots):
        with pytest.raises(TypeError, match="fast_init"):
            fast_init(cls)


def test_the_hot_values_use_it() -> None:
    window = QuotaWindow("{mg:a}:60", 2.0, 60.0)
    state = WindowState(window, 1.0, 120.0)
    assert QuotaOutcome(True, (state,)).charged_at == 0.0 and state.remaining == 1.0
    assert GenerationJob("p", Size(8, 8), 1, 1, 7).negative_prompt is None
    assert ImageAsk("p").n == 1
    assert Decided("free", "t", "admit", "ok", Level.NORMAL, 1.0, 0.0).degraded == ()
    for cls in (Size, GenerationJob, WindowState, QuotaOutcome, ImageAsk, Decided):
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
        assert "_set_" in cls.__init__.__code__.co_names[0]

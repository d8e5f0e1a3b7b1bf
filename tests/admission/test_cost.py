from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meltguard.admission.cost import SEED_MAX, ImageAsk, cost_of, degrade, fit_size, validate
from meltguard.admission.policy import EffectiveTier, Level, Policy, parse_policy
from meltguard.errors import ErrorCode, ServiceError
from meltguard.values import GenerationJob, Size


def make_policy(**limits: Any) -> Policy:
    return parse_policy({
        "version": 1,
        "tiers": {"free": {"priority": 0}},
        "limits": {"max_n": 4, "max_size": "1024x1024", "max_steps": 50,
                   "max_prompt_chars": 100, "default_size": "512x512", "default_steps": 20,
                   **limits},
        "cost": {"reference": {"size": "512x512", "steps": 30}},
    })


POLICY = make_policy()


def test_defaults_fill_size_steps_and_seed() -> None:
    job = validate(ImageAsk("a cat"), POLICY, default_seed=1234)
    assert job == GenerationJob("a cat", Size(512, 512), 20, 1, 1234)


def test_given_values_are_kept() -> None:
    ask = ImageAsk("a cat", size=Size(768, 512), steps=50, n=4, seed=SEED_MAX,
                   negative_prompt="dogs")
    job = validate(ask, POLICY, default_seed=1)
    assert (job.size, job.steps, job.n, job.seed, job.negative_prompt) == (
        Size(768, 512), 50, 4, SEED_MAX, "dogs")


def test_a_seed_is_drawn_when_none_is_passed() -> None:
    assert 0 <= validate(ImageAsk("x"), POLICY).seed <= SEED_MAX


BAD = [
    (ImageAsk(""), "prompt"),
    (ImageAsk("   "), "prompt"),
    (ImageAsk("x" * 101), "prompt"),
    (ImageAsk(None), "prompt"),  # type: ignore[arg-type]
    (ImageAsk("x", n=0), "n"),
    (ImageAsk("x", n=5), "n"),
    (ImageAsk("x", n=True), "n"),
    (ImageAsk("x", n="2"), "n"),  # type: ignore[arg-type]
    (ImageAsk("x", size=Size(513, 512)), "size"),
    (ImageAsk("x", size=Size(512, 4)), "size"),
    (ImageAsk("x", size=Size(1032, 512)), "size"),
    (ImageAsk("x", size=Size(2048, 2048)), "size"),
    (ImageAsk("x", size="512x512"), "size"),  # type: ignore[arg-type]
    (ImageAsk("x", steps=0), "steps"),
    (ImageAsk("x", steps=51), "steps"),
    (ImageAsk("x", steps=2.5), "steps"),  # type: ignore[arg-type]
    (ImageAsk("x", seed=-1), "seed"),
    (ImageAsk("x", seed=SEED_MAX + 1), "seed"),
    (ImageAsk("x", negative_prompt="y" * 101), "negative_prompt"),
]


@pytest.mark.parametrize(("ask", "param"), BAD)
def test_every_bad_input_names_its_param(ask: ImageAsk, param: str) -> None:
    with pytest.raises(ServiceError) as info:
        validate(ask, POLICY, default_seed=0)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert info.value.param == param
    assert info.value.message.endswith(".")


def test_messages_say_what_is_allowed() -> None:
    with pytest.raises(ServiceError, match="1024x1024"):
        validate(ImageAsk("x", size=Size(2048, 512)), POLICY)
    with pytest.raises(ServiceError, match="from 1 to 4"):
        validate(ImageAsk("x", n=9), POLICY)
    with pytest.raises(ServiceError, match="try 512x512"):
        validate(ImageAsk("x", size=Size(513, 515)), POLICY)


def eff(**overrides: Any) -> EffectiveTier:
    base = POLICY.effective("free", Level.NORMAL)
    return dataclasses.replace(base, **overrides)


JOB = GenerationJob("p", Size(1024, 768), steps=40, n=4, seed=7)


def test_degrade_changes_nothing_within_limits() -> None:
    job, changes = degrade(JOB, eff())
    assert job is JOB and changes == ()


def test_degrade_caps_steps_size_and_n() -> None:
    job, changes = degrade(JOB, eff(max_steps=20, max_size=Size(512, 512), max_n=2))
    assert (job.steps, job.size, job.n, job.seed, job.prompt) == (20, Size(512, 384), 2, 7, "p")
    assert changes == ("steps:40->20", "size:1024x768->512x384", "n:4->2")


def test_degrade_keeps_aspect_in_multiples_of_8() -> None:
    job, _ = degrade(dataclasses.replace(JOB, size=Size(1000, 600)), eff(max_size=Size(512, 512)))
    assert job.size == Size(512, 304)  # 1000x600 scaled by 0.512 is 512x307.2


def test_cost_counts_reference_images() -> None:
    assert cost_of(GenerationJob("p", Size(512, 512), 30, 1, 0), POLICY) == 1.0
    assert cost_of(GenerationJob("p", Size(1024, 1024), 30, 1, 0), POLICY) == 4.0
    assert cost_of(GenerationJob("p", Size(512, 512), 15, 2, 0), POLICY) == 1.0
    assert cost_of(GenerationJob("p", Size(512, 256), 60, 3, 0), POLICY) == 3.0


sizes = st.builds(Size, st.integers(1, 512).map(lambda v: v * 8), st.integers(1, 512).map(
    lambda v: v * 8))


@given(sizes, sizes)
def test_fit_size_fits_in_multiples_of_8_keeping_aspect(size: Size, limit: Size) -> None:
    fitted = fit_size(size, limit)
    assert fitted.fits_in(limit)
    assert fitted.width % 8 == 0 and fitted.height % 8 == 0
    if size.fits_in(limit):
        assert fitted == size
    else:
        assert fitted.pixels <= size.pixels
        # Flooring to 8 moves each side by under 8 px, so the aspect stays close.
        if min(fitted.width, fitted.height) >= 64:
            ratio = (fitted.width / fitted.height) / (size.width / size.height)
            assert 0.85 < ratio < 1.18

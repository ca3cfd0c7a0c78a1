"""The generator's step callback on the tiny preset: called once per denoising step, and what it raises ends
the pass there without leaving state behind (how a cancelled batch's slice stops mid-generation)."""

from __future__ import annotations

import numpy as np
import pytest

from farm.ml.generator import Generator

KW = dict(prompt="a red cat", negative_prompt="", guidance=5.0, width=32, height=32)


class _Stop(Exception):
    pass


def test_on_step_sees_every_step_of_the_pass(tiny_generator: Generator) -> None:
    seen: list[tuple[int, int]] = []
    tiny_generator.generate(
        seeds=[1], steps=6, scheduler="ddim", on_step=lambda s, n: seen.append((s, n)), **KW
    )
    assert seen == [(i, 6) for i in range(1, 7)]


def test_what_on_step_raises_stops_the_pass_at_that_step_and_the_next_pass_is_unchanged(
    tiny_generator: Generator,
) -> None:
    before = tiny_generator.generate(seeds=[3, 4], steps=4, scheduler="ddim", **KW)
    calls: list[int] = []

    def stop_at_3(step: int, steps: int) -> None:
        calls.append(step)
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        tiny_generator.generate(seeds=[3, 4], steps=200, scheduler="ddim", on_step=stop_at_3, **KW)
    assert calls == [1, 2, 3]  # 197 steps and the VAE decode never ran
    after = tiny_generator.generate(seeds=[3, 4], steps=4, scheduler="ddim", **KW)
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

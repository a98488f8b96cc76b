"""The selection queue: batched selection across callers, and its cache of selections for inputs seen before.

A real `CachedSelector` on a tiny random model does the scoring; `Counting` only records what it was asked, so
the tests can say which inputs cost a selection pass.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Sequence

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.core.selection import CachedSelector, Selection, prepare_selection_model
from server.online.selection_queue import SelectionQueue

VOCAB = 128


class Counting:
    """A selector that records every input it scores, then has a real selector score them."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        model = prepare_selection_model(LlamaForCausalLM(config))
        prompts = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(seed))
        self._selector = CachedSelector(model, prompts)
        self.scored: list[list[int]] = []

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        self.scored.extend(list(ids) for ids in batch)
        return self._selector.select(batch)


def run(cache_size: int, calls: list[tuple[Counting, list[list[int]]]]) -> list[list[Selection]]:
    """Start a queue, make the calls one after the other, stop it; the selections of each call."""

    async def main() -> list[list[Selection]]:
        queue = SelectionQueue(max_batch=16, wait_s=0.001, cache_size=cache_size)
        queue.start()
        try:
            return [await queue.select(selector, inputs) for selector, inputs in calls]
        finally:
            await queue.stop()

    return asyncio.run(main())


A, B, C = [5, 6, 7], [8, 9, 10, 11], [12, 13]


@pytest.fixture
def selector() -> Counting:
    return Counting(seed=1)


def test_a_repeated_input_is_scored_once_and_answered_alike_in_no_time(selector: Counting) -> None:
    first, again = run(cache_size=8, calls=[(selector, [A, B]), (selector, [B, A])])
    assert selector.scored == [A, B]
    assert [(s.index, s.scores, s.margin) for s in again] == [(s.index, s.scores, s.margin) for s in first[::-1]]
    assert all(s.seconds > 0 for s in first) and all(s.seconds == 0.0 for s in again)


def test_the_same_input_twice_in_one_pass_is_scored_once(selector: Counting) -> None:
    (twice,) = run(cache_size=0, calls=[(selector, [A, A, B])])
    assert selector.scored == [A, B]
    assert twice[0] == twice[1]


def test_with_the_cache_off_every_call_is_scored(selector: Counting) -> None:
    run(cache_size=0, calls=[(selector, [A]), (selector, [A])])
    assert selector.scored == [A, A]


def test_the_least_recently_used_input_is_forgotten_first(selector: Counting) -> None:
    run(cache_size=2, calls=[(selector, [A]), (selector, [B]), (selector, [A]), (selector, [C]), (selector, [A, B])])
    assert selector.scored == [A, B, C, B], "A was used again before C came, so B was the one forgotten"


def test_another_selector_never_answers_from_the_first_ones_entries(selector: Counting) -> None:
    reloaded = Counting(seed=2)  # what a bank reload hands the queue: a new selector for the same name
    first, other = run(cache_size=8, calls=[(selector, [A]), (reloaded, [A])])
    assert selector.scored == [A] and reloaded.scored == [A]
    assert first[0].scores != other[0].scores


def test_a_refused_input_is_not_remembered_and_does_not_fail_its_neighbours(selector: Counting) -> None:
    bad = [VOCAB + 1]

    async def main() -> tuple[list[Selection], BaseException | None]:
        queue = SelectionQueue(max_batch=16, wait_s=0.01, cache_size=8)
        queue.start()
        try:
            good, refused = await asyncio.gather(
                queue.select(selector, [A]), queue.select(selector, [bad]), return_exceptions=True
            )
            with pytest.raises(ValueError, match="out of range"):
                await queue.select(selector, [bad])
            return good, refused
        finally:
            await queue.stop()

    good, refused = asyncio.run(main())
    assert isinstance(refused, ValueError) and "out of range" in str(refused)
    assert good[0].seconds > 0
    assert selector.scored.count(bad) == 3, "the failed batch, the culprit alone, then the second request again"


class Fixed:
    """A selector that picks row `index[0]` for every input (changeable between calls)."""

    def __init__(self) -> None:
        self.index = [0]

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        return [Selection(index=self.index[0], scores=(0.5, 0.5), margin=0.0, seconds=0.001) for _ in batch]


def test_the_guess_is_the_inputs_remembered_selection_else_its_selectors_last_else_none() -> None:
    async def main() -> list[int | None]:
        queue = SelectionQueue(max_batch=1, wait_s=0.0, cache_size=8)
        queue.start()
        first, other = Fixed(), Fixed()
        try:
            guesses = [queue.guess(first, A)]  # nothing selected yet
            first.index[0] = 1
            await queue.select(first, [A])
            first.index[0] = 0
            await queue.select(first, [B])
            return [*guesses, queue.guess(first, A), queue.guess(first, C), queue.guess(other, C)]
        finally:
            await queue.stop()

    # A remembered (row 1); C unseen: the last selection (row 0, of B); another selector has none
    assert asyncio.run(main()) == [None, 1, 0, None]


def test_the_guess_rate_starts_trusting_and_follows_the_recent_guesses_of_each_selector() -> None:
    queue = SelectionQueue(max_batch=1, wait_s=0.0)
    traffic, other = Fixed(), Fixed()
    assert queue.guess_rate(traffic) == 1.0, "a new bank's first guesses are tried"
    for _ in range(7):
        queue.score_guess(traffic, guessed=0, chosen=1)
    assert queue.guess_rate(traffic) == pytest.approx(0.9**7)  # an exponential average, newest weighted 0.1
    for _ in range(30):
        queue.score_guess(traffic, guessed=2, chosen=2)
    assert queue.guess_rate(traffic) > 0.95, "right guesses win it back"
    assert queue.guess_rate(other) == 1.0, "each selector (bank) has its own"


def test_a_guess_does_not_keep_a_reloaded_banks_selector_alive() -> None:
    async def main() -> bool:
        queue = SelectionQueue(max_batch=1, wait_s=0.0, cache_size=0)
        queue.start()
        try:
            selector = Fixed()
            await queue.select(selector, [A])
            assert queue.guess(selector, B) == 0
            gone = weakref.ref(selector)
            del selector  # the bank set that held it was replaced
            gc.collect()
            return gone() is None
        finally:
            await queue.stop()

    assert asyncio.run(main())

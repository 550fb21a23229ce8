"""The benchmark's call order: every implementation follows every other one equally often."""

import collections

import pytest
import torch

from online_softmax.bench import balanced_order, median_times


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_order_has_every_predecessor_once(n):
    order = balanced_order(n)
    pairs = collections.Counter(zip(order, order[1:] + order[:1]))  # cyclic: the order repeats
    if n == 1:
        assert order == [0]
        return
    assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(pairs.values()) == {1}
    assert collections.Counter(order) == {i: n - 1 for i in range(n)}


def test_median_times_balances_what_runs_before_each_call():
    """Three calls, as the library benchmark times ours, torch and torch.compile: each call's
    predecessors are the two others, equally often (a rotating start gave 2:1)."""
    last = [None]
    before = {name: collections.Counter() for name in "abc"}

    def call(name):
        def fn():
            before[name][last[0]] += 1
            last[0] = name
        return fn

    times = median_times({name: call(name) for name in "abc"}, torch.device("cpu"), min_runs=20, max_runs=20)
    assert set(times) == set("abc") and all(t >= 0 for t in times.values())
    for name, counts in before.items():
        others = [o for o in "abc" if o != name]
        timed = {o: counts[o] for o in others}
        # the warm-up round (a, b, c once each) adds one predecessor; the timed calls are balanced
        assert abs(timed[others[0]] - timed[others[1]]) <= 1, (name, counts)
        assert counts[name] == 0

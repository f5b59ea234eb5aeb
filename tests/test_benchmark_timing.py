"""Shared timing flows of ``diffmem.benchmark``: interleaved rounds of several implementations."""

from __future__ import annotations

from diffmem.benchmark import interleaved


def _recorder():
    calls: list[str] = []

    def make(name):
        def run():
            calls.append(name)
            return f"{name}-{calls.count(name)}"

        return run

    return calls, {n: make(n) for n in ("a", "b", "c")}


def test_interleaved_runs_every_implementation_once_per_round_in_order():
    calls, runs = _recorder()
    times, results = interleaved(runs, repeats=2)
    assert calls == ["a", "b", "c", "a", "b", "c"]
    assert {n: len(t) for n, t in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert all(t >= 0 for ts in times.values() for t in ts)
    assert results == {"a": "a-2", "b": "b-2", "c": "c-2"}  # each run's last result


def test_interleaved_abba_reverses_every_other_round():
    calls, runs = _recorder()
    interleaved(runs, repeats=3, abba=True)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]


def test_interleaved_with_no_rounds_runs_nothing():
    calls, runs = _recorder()
    assert interleaved(runs, repeats=0) == ({"a": [], "b": [], "c": []}, {})
    assert calls == []

"""Neighbourhoods of a permutation row and random perturbations.

A move operator maps a permutation row (``row[i]`` = expert of gate slot ``i``) and a numpy
``Generator`` to an iterable of new rows. Users may pass their own with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["MoveOperator", "swap_moves", "insertion_moves", "rotation_moves", "perturb", "MOVES"]

MoveOperator = Callable[[np.ndarray, np.random.Generator], Iterable[Sequence[int]]]


def swap_moves(row: np.ndarray, rng: np.random.Generator | None = None) -> Iterator[tuple[int, ...]]:
    """All n(n−1)/2 transpositions (2-opt): exchange the experts of slots a < b."""
    n = len(row)
    for a in range(n):
        for b in range(a + 1, n):
            new = list(row)
            new[a], new[b] = new[b], new[a]
            yield tuple(int(v) for v in new)


def insertion_moves(row: np.ndarray, rng: np.random.Generator | None = None) -> Iterator[tuple[int, ...]]:
    """Take the expert of slot a out and re-insert it at slot b (a cyclic shift of the segment between).

    Moves equal to a swap of neighbours are produced once.
    """
    n = len(row)
    seen: set[tuple[int, ...]] = set()
    base = [int(v) for v in row]
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            new = base[:a] + base[a + 1 :]
            new.insert(b, base[a])
            key = tuple(new)
            if key not in seen:
                seen.add(key)
                yield key


def rotation_moves(row: np.ndarray, rng: np.random.Generator | None = None) -> Iterator[tuple[int, ...]]:
    """The n−1 cyclic shifts of the whole row (every slot moves to the next expert(s) at once)."""
    n = len(row)
    base = [int(v) for v in row]
    for s in range(1, n):
        yield tuple(base[s:] + base[:s])


def perturb(row: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    """``strength`` random transpositions (the kick of an iterated local search)."""
    new = np.array(row, dtype=np.int64, copy=True)
    n = len(new)
    for _ in range(strength):
        a, b = rng.choice(n, size=2, replace=False)
        new[a], new[b] = new[b], new[a]
    return new


MOVES: dict[str, MoveOperator] = {"swap": swap_moves, "insertion": insertion_moves, "rotation": rotation_moves}

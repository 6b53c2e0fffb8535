"""Tests for routing_search.exact.move_graph (landscape): hand-checked counts, independent loops, plot, errors."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from routing_search.exact.move_graph import landscape
from routing_search.exact.permutation_solver import permutation_loss, solve_permutation


def _table_objective(nodes, seed: int):
    rng = np.random.default_rng(seed)
    table = {v: float(x) for v, x in zip(nodes, rng.permutation(len(nodes)))}  # distinct losses
    return table, table.__getitem__


def test_hand_checked_three_permutations() -> None:
    # Under swaps, S3 is the complete bipartite graph between even and odd permutations (K_{3,3}).
    losses = {
        (0, 1, 2): 0.0,  # even
        (1, 2, 0): 3.0,  # even
        (2, 0, 1): 1.0,  # even
        (0, 2, 1): 2.0,  # odd
        (1, 0, 2): 4.0,  # odd
        (2, 1, 0): 5.0,  # odd
    }
    s = landscape(losses.__getitem__, 3)
    assert s.num_nodes == 6 and s.num_edges == 9
    # Each odd node's best neighbour is (0,1,2); each even node's best neighbour is (0,2,1) at 2.0,
    # so (2,0,1) [1.0] is a local optimum, (1,2,0) [3.0] descends to (0,2,1) → (0,1,2).
    assert s.local_optima == [(0, 1, 2), (2, 0, 1)]
    assert s.global_optimum == (0, 1, 2) and s.global_loss == 0.0
    assert s.basin_sizes == {(0, 1, 2): 5, (2, 0, 1): 1}
    assert s.success_probability == pytest.approx(5 / 6)
    assert s.graph.nodes[(1, 0, 2)]["loss"] == 4.0
    assert set(s.descent_graph.successors((1, 2, 0))) == {(0, 2, 1)}


def _independent_summary(nodes, neighbours, loss):
    """Plain loops: local optima, and where steepest descent from every node ends."""
    order = {v: i for i, v in enumerate(nodes)}
    local = [v for v in nodes if all(loss[u] >= loss[v] for u in neighbours(v))]
    ends = {}
    for v in nodes:
        cur = v
        while True:
            better = [u for u in neighbours(cur) if loss[u] < loss[cur]]
            if not better:
                break
            cur = min(better, key=lambda u: (loss[u], order[u]))
        ends[v] = cur
    return local, Counter(ends.values())


def _swap_nbrs(v):
    out = []
    for i, j in itertools.combinations(range(len(v)), 2):
        w = list(v)
        w[i], w[j] = w[j], w[i]
        out.append(tuple(w))
    return out


def _insertion_nbrs(v):
    out = set()
    for i in range(len(v)):
        rest = list(v[:i] + v[i + 1 :])
        for j in range(len(v)):
            w = tuple(rest[:j] + [v[i]] + rest[j:])
            if w != v:
                out.add(w)
    return sorted(out)


@pytest.mark.parametrize("move, nbrs", [("swap", _swap_nbrs), ("insertion", _insertion_nbrs)])
@pytest.mark.parametrize("seed", [0, 1])
def test_permutations_match_independent_loop(move, nbrs, seed: int) -> None:
    n = 5
    nodes = list(itertools.permutations(range(n)))
    table, objective = _table_objective(nodes, seed)
    s = landscape(objective, n, move=move)
    local, ends = _independent_summary(nodes, nbrs, table)
    assert s.num_nodes == 120
    assert sorted(s.local_optima) == sorted(local)
    assert s.basin_sizes == dict(ends)
    assert sum(s.basin_sizes.values()) == s.num_nodes
    assert s.global_optimum in s.local_optima
    assert s.success_probability == pytest.approx(s.basin_sizes[s.global_optimum] / 120)
    degree = n * (n - 1) // 2 if move == "swap" else (n - 1) ** 2
    assert all(d == degree for _, d in s.graph.degree())
    assert s.num_edges == 120 * degree // 2


def test_subsets_match_independent_loop() -> None:
    n, k = 7, 3
    nodes = list(itertools.combinations(range(n), k))
    table, objective = _table_objective(nodes, 3)

    def nbrs(v):
        return sorted(tuple(sorted(set(v) - {a} | {b})) for a in v for b in range(n) if b not in v)

    s = landscape(objective, n, space="subsets", k=k)
    local, ends = _independent_summary(nodes, nbrs, table)
    assert s.num_nodes == 35
    assert all(d == k * (n - k) for _, d in s.graph.degree())
    assert sorted(s.local_optima) == sorted(local)
    assert s.basin_sizes == dict(ends)
    assert s.global_optimum == min(nodes, key=table.__getitem__)


def test_ties_and_plateaus() -> None:
    # constant objective: every node is a (plateau) local optimum and a global optimum
    s = landscape(lambda p: 1.0, 3)
    assert len(s.local_optima) == 6 and len(s.global_optima) == 6
    assert s.success_probability == 1.0
    assert all(size == 1 for size in s.basin_sizes.values())


def test_empirical_success_agrees_with_exact() -> None:
    nodes = list(itertools.permutations(range(5)))
    _, objective = _table_objective(nodes, 4)
    s = landscape(objective, 5, starts=4000, rng=0)
    assert s.empirical_success == pytest.approx(s.success_probability, abs=0.03)
    again = landscape(objective, 5, starts=4000, rng=0)
    assert again.empirical_success == s.empirical_success


def test_landscape_of_a_routing_instance() -> None:
    rng = np.random.default_rng(5)
    g = rng.dirichlet(np.ones(5))
    F = rng.normal(size=(20, 5, 2))
    y = rng.normal(size=(20, 2))
    s = landscape(lambda p: permutation_loss(np.array(p), g, F, y), 5)
    best = solve_permutation(g, F, y, method="exhaustive")
    assert s.global_loss == pytest.approx(best.fun, rel=1e-12)
    assert 0.0 < s.success_probability <= 1.0


def test_plot_writes_and_refuses_overwrite(tmp_path) -> None:
    nodes = list(itertools.permutations(range(4)))
    _, objective = _table_objective(nodes, 0)
    s = landscape(objective, 4)
    path = tmp_path / "landscape.png"
    assert s.plot(path) == path
    assert path.stat().st_size > 0
    with pytest.raises(FileExistsError, match="overwrite=True"):
        s.plot(path)
    s.plot(path, overwrite=True)
    with pytest.raises(ValueError, match="path must end in"):
        s.plot(tmp_path / "landscape.unknownext")


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="n must be <= 8"):
        landscape(lambda p: 0.0, 9)
    with pytest.raises(ValueError, match="k is required"):
        landscape(lambda p: 0.0, 4, space="subsets")
    with pytest.raises(ValueError, match="k is only used"):
        landscape(lambda p: 0.0, 4, k=2)
    with pytest.raises(ValueError, match="move must be 'swap'"):
        landscape(lambda p: 0.0, 4, space="subsets", k=2, move="insertion")
    with pytest.raises(ValueError, match="space must be one of"):
        landscape(lambda p: 0.0, 4, space="trees")
    with pytest.raises(ValueError, match="move must be one of"):
        landscape(lambda p: 0.0, 4, move="flip")
    with pytest.raises(ValueError, match="k must be <= 4"):
        landscape(lambda p: 0.0, 4, space="subsets", k=5)
    with pytest.raises(ValueError, match="non-finite"):
        landscape(lambda p: float("nan"), 3)
    with pytest.raises(TypeError, match="objective must be a callable"):
        landscape(3.0, 3)
    with pytest.raises(ValueError, match="exceeds the limit"):
        landscape(lambda p: 0.0, 40, space="subsets", k=20)
    # rng is normalised by the package's one helper (check_rng), with its message
    with pytest.raises(TypeError, match="rng must be None, a non-negative integer seed or a numpy.random.Generator"):
        landscape(lambda p: 0.0, 3, starts=5, rng="seed")
    with pytest.raises(ValueError, match="rng must be a non-negative integer seed"):
        landscape(lambda p: 0.0, 3, starts=5, rng=-2)

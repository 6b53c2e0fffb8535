"""Exhaustive landscape analysis (the move graph) of small selection problems: local optima, basins, success probability.

The search space is either all permutations of ``range(n)`` (nodes are tuples ``perm`` with
``perm[i]`` = expert that receives slot ``i``) or all k-subsets of ``range(n)`` (nodes are sorted
tuples). Two nodes are adjacent when one move turns one into the other:

* permutations, ``move="swap"``: exchange the entries at two positions (n(n−1)/2 neighbours);
* permutations, ``move="insertion"``: take the entry at one position and reinsert it at another
  ((n−1)² distinct neighbours; moving to an adjacent position is also a swap);
* subsets, ``move="swap"``: exchange one member for one non-member (k(n−k) neighbours).

Steepest descent moves from a node to its best *strictly* better neighbour (ties between equally good
neighbours go to the one first in enumeration order: lexicographic order of the tuples) and stops at a
node with no strictly better neighbour — a local optimum (plateaus included). The descent edges form a
forest of in-trees, one per local optimum; a local optimum's basin is its weakly connected component
in that forest. The probability that steepest descent from a uniformly random node ends at a global
optimum is therefore exactly (sum of the global optima's basin sizes) / (number of nodes).
Losses are compared exactly (no tolerance).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from .._validation import check_choice, check_int, check_rng

__all__ = ["landscape", "LandscapeSummary", "SPACES", "MOVES", "MAX_PERMUTATION_N", "MAX_NODES"]

SPACES = ("permutations", "subsets")
MOVES = ("swap", "insertion")
MAX_PERMUTATION_N = 8
MAX_NODES = 200_000

Node = tuple[int, ...]


@dataclass
class LandscapeSummary:
    """Result of :func:`landscape`.

    Attributes:
        graph: undirected move graph; node attribute ``'loss'``.
        descent_graph: directed steepest-descent forest (edge node → its best strictly better neighbour).
        space, move: what was enumerated.
        num_nodes, num_edges: size of ``graph``.
        local_optima: nodes without a strictly better neighbour, sorted by (loss, node).
        global_optima: local optima with the minimum loss; ``global_optimum`` is the first of them.
        global_loss: the minimum loss.
        basin_sizes: local optimum → number of nodes whose steepest descent ends there (sums to num_nodes).
        success_probability: exact probability that steepest descent from a uniform random node reaches
            a global optimum.
        empirical_success: fraction of ``starts`` simulated random-start descents that did (None if starts=0).
        losses: loss of every node, in enumeration (lexicographic) order.
    """

    graph: nx.Graph
    descent_graph: nx.DiGraph
    space: str
    move: str
    num_nodes: int
    num_edges: int
    local_optima: list[Node]
    global_optima: list[Node]
    global_optimum: Node
    global_loss: float
    basin_sizes: dict[Node, int]
    success_probability: float
    empirical_success: float | None = None
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def plot(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save a figure (loss histogram with local optima marked; basin size per local optimum) to ``path``.

        The format follows the file suffix (e.g. ``.png``, ``.pdf``, ``.svg``). Refuses to replace an
        existing file unless ``overwrite=True``. Uses the Agg canvas directly (no pyplot state).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        fmt = path.suffix.lstrip(".").lower()
        fig = Figure(figsize=(10, 4), layout="constrained")
        canvas = FigureCanvasAgg(fig)
        supported = canvas.get_supported_filetypes()
        if fmt not in supported:
            suffixes = ", ".join("." + s for s in sorted(supported))
            raise ValueError(f"path must end in one of {suffixes}; got {str(path)!r}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it")

        ax_hist, ax_basin = fig.subplots(1, 2)
        ax_hist.hist(self.losses, bins=min(50, max(5, self.num_nodes // 20)), color="0.7", label="all nodes")
        opt_losses = [self.graph.nodes[v]["loss"] for v in self.local_optima]
        ax_hist.plot(
            opt_losses, np.zeros(len(opt_losses)), "|", color="tab:blue", markersize=14, label="local optima"
        )
        ax_hist.axvline(self.global_loss, color="tab:red", linestyle="--", label="global optimum")
        ax_hist.set_xlabel("loss")
        ax_hist.set_ylabel("number of nodes")
        ax_hist.set_title(f"{self.num_nodes} {self.space}, move={self.move}")
        ax_hist.legend(fontsize="small")

        sizes = [self.basin_sizes[v] for v in self.local_optima]
        colors = ["tab:red" if v in set(self.global_optima) else "tab:blue" for v in self.local_optima]
        ax_basin.bar(np.arange(len(sizes)), sizes, color=colors)
        ax_basin.set_xlabel("local optimum (sorted by loss)")
        ax_basin.set_ylabel("basin size (nodes)")
        ax_basin.set_title(
            f"{len(self.local_optima)} local optima; P(reach global) = {self.success_probability:.3f}"
        )
        with open(path, "wb" if overwrite else "xb") as fh:
            fig.savefig(fh, format=fmt)
        return path


# ---------------------------------------------------------------------------------------------------
# Spaces and moves
# ---------------------------------------------------------------------------------------------------


def _nodes(space: str, n: int, k: int | None) -> list[Node]:
    if space == "permutations":
        return list(itertools.permutations(range(n)))
    assert k is not None
    return list(itertools.combinations(range(n), k))


def _neighbours(node: Node, space: str, move: str, n: int) -> Iterator[Node]:
    if space == "subsets":
        members = set(node)
        for a in node:
            for b in range(n):
                if b not in members:
                    yield tuple(sorted((members - {a}) | {b}))
        return
    if move == "swap":
        for i in range(n - 1):
            for j in range(i + 1, n):
                cand = list(node)
                cand[i], cand[j] = cand[j], cand[i]
                yield tuple(cand)
        return
    seen: set[Node] = set()
    for i in range(n):
        rest = node[:i] + node[i + 1 :]
        for j in range(n):
            if j == i:
                continue
            moved = rest[:j] + (node[i],) + rest[j:]
            if moved not in seen:
                seen.add(moved)
                yield moved


def _descend(start: int, nbrs: list[list[int]], losses: np.ndarray) -> int:
    """Follow steepest descent from node index ``start`` (independent of the graph bookkeeping)."""
    cur = start
    while True:
        best = cur
        for j in nbrs[cur]:  # ascending index: the first of equally good neighbours wins
            if losses[j] < losses[best]:
                best = j
        if best == cur:
            return cur
        cur = best


# ---------------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------------


def landscape(
    objective: Callable[[Node], float],
    n: int,
    *,
    space: str = "permutations",
    k: int | None = None,
    move: str = "swap",
    starts: int = 0,
    rng: Any = None,
) -> LandscapeSummary:
    """Enumerate a small search space and summarise its landscape under steepest descent.

    Args:
        objective: callable on a node (permutation tuple, or sorted k-subset tuple) returning a finite
            float to minimise.
        n: number of experts; permutations need n <= 8 (8! = 40320 nodes).
        space: ``"permutations"`` or ``"subsets"``.
        k: subset size (required for subsets, 1 <= k <= n; must be None for permutations).
        move: ``"swap"`` or ``"insertion"`` (insertion only for permutations).
        starts: number of uniformly random starts whose steepest descent is simulated directly, as an
            empirical check of the exact ``success_probability`` (0 = skip).
        rng: None, a seed or a ``numpy.random.Generator`` (checked by
            :func:`routing_search._validation.check_rng`) for the random starts; unused when
            ``starts=0`` (the enumeration itself is exhaustive and deterministic).

    Returns:
        :class:`LandscapeSummary`.

    Example:
        The squared-loss permutation problem of a small static gate, compared with exhaustive
        enumeration by :func:`~routing_search.exact.solve_permutation`:

        >>> from routing_search.exact import permutation_loss, solve_permutation
        >>> rng = np.random.default_rng(5)
        >>> g = rng.dirichlet(np.ones(4)); F = rng.normal(size=(20, 4, 2)); y = rng.normal(size=(20, 2))
        >>> s = landscape(lambda p: permutation_loss(p, g, F, y), 4, move="swap")
        >>> s.num_nodes, s.num_edges                      # 4! nodes, each with C(4, 2) = 6 swaps
        (24, 72)
        >>> best = solve_permutation(g, F, y, method="exhaustive")
        >>> s.global_optimum == tuple(best.x.tolist()), bool(np.isclose(s.global_loss, best.fun))
        (True, True)
        >>> sum(s.basin_sizes.values()) == s.num_nodes and 0.0 < s.success_probability <= 1.0
        True
    """
    if not callable(objective):
        raise TypeError(
            "objective must be a callable taking a node tuple and returning a float, "
            f"got {type(objective).__name__}"
        )
    check_choice("space", space, SPACES)
    check_choice("move", move, MOVES)
    n = check_int("n", n, minimum=1)
    starts = check_int("starts", starts, minimum=0)
    if space == "permutations":
        if k is not None:
            raise ValueError(f"k is only used with space='subsets'; got k={k!r} with space='permutations'")
        if n > MAX_PERMUTATION_N:
            raise ValueError(
                f"n must be <= {MAX_PERMUTATION_N} for space='permutations' "
                f"(n! nodes: {math.factorial(n)} for n={n})"
            )
    else:
        if k is None:
            raise ValueError(f"k is required for space='subsets' (an integer in [1, n={n}])")
        k = check_int("k", k, minimum=1, maximum=n)
        if move != "swap":
            raise ValueError(
                f"move must be 'swap' for space='subsets' (exchange a member for a non-member); got {move!r}"
            )
        if math.comb(n, k) > MAX_NODES:
            raise ValueError(f"C(n={n}, k={k}) = {math.comb(n, k)} subsets exceeds the limit of {MAX_NODES}")
    generator = check_rng(rng)

    nodes = _nodes(space, n, k)
    index = {v: i for i, v in enumerate(nodes)}
    losses = np.empty(len(nodes))
    for i, v in enumerate(nodes):
        raw = objective(v)
        try:
            val = float(raw)
        except (TypeError, ValueError):
            raise TypeError(f"objective must return a float; got {type(raw).__name__} for node {v}") from None
        if not math.isfinite(val):
            raise ValueError(f"objective returned a non-finite value ({val}) for node {v}")
        losses[i] = val
    nbrs = [sorted(index[u] for u in _neighbours(v, space, move, n)) for v in nodes]

    graph = nx.Graph()
    graph.add_nodes_from((v, {"loss": float(losses[i])}) for i, v in enumerate(nodes))
    graph.add_edges_from((nodes[i], nodes[j]) for i in range(len(nodes)) for j in nbrs[i] if j > i)

    descent = nx.DiGraph()
    descent.add_nodes_from(nodes)
    for i, v in enumerate(nodes):
        if nbrs[i]:
            j = min(nbrs[i], key=lambda t: (losses[t], t))
            if losses[j] < losses[i]:
                descent.add_edge(v, nodes[j])

    local_optima = sorted((v for v in nodes if descent.out_degree(v) == 0), key=lambda v: (losses[index[v]], v))
    basin_sizes: dict[Node, int] = {}
    for component in nx.weakly_connected_components(descent):
        sinks = [v for v in component if descent.out_degree(v) == 0]
        assert len(sinks) == 1, "a descent tree has exactly one sink"
        basin_sizes[sinks[0]] = len(component)
    basin_sizes = {v: basin_sizes[v] for v in local_optima}

    global_loss = float(losses.min())
    global_optima = [v for v in local_optima if losses[index[v]] == global_loss]
    success = sum(basin_sizes[v] for v in global_optima) / len(nodes)

    empirical = None
    if starts > 0:
        targets = {index[v] for v in global_optima}
        draws = generator.integers(len(nodes), size=starts)
        hits = sum(_descend(int(s), nbrs, losses) in targets for s in draws)
        empirical = hits / starts

    return LandscapeSummary(
        graph=graph,
        descent_graph=descent,
        space=space,
        move=move,
        num_nodes=graph.number_of_nodes(),
        num_edges=graph.number_of_edges(),
        local_optima=local_optima,
        global_optima=global_optima,
        global_optimum=global_optima[0],
        global_loss=global_loss,
        basin_sizes=basin_sizes,
        success_probability=success,
        empirical_success=empirical,
        losses=losses,
    )

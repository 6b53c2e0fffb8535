"""The whole 2-opt (swap) neighbourhood of one permutation row, kept up to date incrementally.

For every row ``b`` and gate slot ``a`` carrying weight there ("entries"), and every expert ``e``, the
loss change ``δ(b, a→e)`` of giving slot ``a`` expert ``e`` is computed by broadcasting over the row's
expert outputs. A swap (a, c) gives slot ``a`` expert ``π(c)`` and slot ``c`` expert ``π(a)``, so its loss
change is ``Σ_b δ(b, a→π(c)) + δ(b, c→π(a))``, except on rows where both slots carry weight: there the
joint change is computed exactly and replaces the two single-slot terms ("triples" (b, a, c)).

Which (row, slot) pairs carry weight depends only on the gate, not on the permutation. After a move
only the rows whose mixture or loss changed need their terms recomputed; the objective marks them
dirty at every refresh, so each scan after the first costs in proportion to the rows a move touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .objective import RoutingObjective

__all__ = ["SwapScan", "active_pairs"]


class SwapScan:
    """Cached swap-neighbourhood terms of selector ``selector`` of permutation module ``slot``."""

    def __init__(self, objective: RoutingObjective, slot: int, selector: int) -> None:
        self.obj = objective
        self.slot = slot
        self.selector = selector
        n, batch, device = objective.n, objective.batch, objective.F.device
        # Each task's weights [B, n] flattened (row-major: (row, slot) -> row * n + slot), gathered per chunk.
        self.weights = {
            t: objective.contrib[t][:, selector, :].to(objective.F.dtype).reshape(-1) for t in objective.slot_tasks[slot]
        }
        active = torch.zeros(batch * n, dtype=torch.bool, device=device)
        for w in self.weights.values():
            active |= w != 0
        active = active.view(batch, n)
        self.entry_b, self.entry_a = torch.nonzero(active, as_tuple=True)
        self.entry_cell = self.entry_b * n + self.entry_a  # (row, slot) of each entry, flat
        self.entry_id = torch.full((batch * n,), -1, dtype=torch.long, device=device)
        self.entry_id[self.entry_cell] = torch.arange(self.entry_b.numel(), device=device)
        # k when every row with an entry has exactly k of them (TopK(k): always): a chunk's entries are then
        # whole rows, k after k, and their candidate mixtures broadcast over the rows' expert outputs.
        per_row = torch.bincount(self.entry_b, minlength=batch)
        counts = per_row[per_row > 0]
        self.entries_per_row = int(counts[0]) if counts.numel() and bool((counts == counts[0]).all()) else None
        self.tri_b, self.tri_a, self.tri_c = active_pairs(active, entries_per_row=self.entries_per_row)
        self.delta = torch.zeros(self.entry_b.numel(), n, dtype=torch.float64, device=device)
        self.tri_value = torch.zeros(self.tri_b.numel(), dtype=torch.float64, device=device)
        self.D = torch.zeros(n * n, dtype=torch.float64, device=device)  # D[a, e] = Σ_b δ(b, a→e)
        self.correction = torch.zeros(n * n, dtype=torch.float64, device=device)
        self.dirty = torch.ones(batch, dtype=torch.bool, device=device)
        self.last_index = objective.state[slot][selector].clone()

    def mark_dirty(self, rows: torch.Tensor) -> None:
        """Rows (bool ``[B]``) whose mixture or loss changed since the terms were computed."""
        self.dirty |= rows

    @torch.no_grad()
    def local_changes(self) -> torch.Tensor:
        """Summed loss change of every swap (a, c) over this rank's rows: ``[n, n]`` float64 (no communication).

        The objective adds the other ranks' tables, divides by the number of rows and adds the current loss.
        """
        obj, n = self.obj, self.obj.n
        index = obj.state[self.slot][self.selector]
        moved = index != self.last_index  # slots whose expert changed: their terms depend on it
        if bool(moved.any()):
            self.dirty[self.entry_b[moved[self.entry_a]]] = True
            self.last_index = index.clone()
        if bool(self.dirty.any()):
            self._update_entries(torch.nonzero(self.dirty[self.entry_b]).flatten(), index)
            self._update_triples(torch.nonzero(self.dirty[self.tri_b]).flatten(), index)
            self.dirty.zero_()
        D = self.D.view(n, n)
        swapped = D[:, index]  # [a, c] = D[a, π(c)]
        correction = self.correction.view(n, n)
        return swapped + swapped.t() + correction + correction.t()

    def _update_entries(self, ids: torch.Tensor, index: torch.Tensor) -> None:
        obj, n = self.obj, self.obj.n
        device = ids.device
        per_chunk = max(1, obj.max_rows // n)
        F_flat = obj.F.reshape(obj.batch * n, obj.F.shape[2])  # row-major: (row, expert) -> row * n + expert
        experts = torch.arange(n, device=device)
        k = self.entries_per_row
        whole_rows = k is not None and per_chunk % k == 0  # (the dirty entries are whole rows, k after k)
        for lo in range(0, ids.numel(), per_chunk):
            chunk = ids[lo : lo + per_chunk]
            b, a = self.entry_b.index_select(0, chunk), self.entry_a.index_select(0, chunk)
            cell = self.entry_cell.index_select(0, chunk)
            F_old = F_flat.index_select(0, b * n + index.index_select(0, a)).unsqueeze(1)
            coeff = {t: w.index_select(0, cell).view(-1, 1, 1) for t, w in self.weights.items()}
            base = {t: obj.mixtures[t].index_select(0, b).unsqueeze(1) - c * F_old for t, c in coeff.items()}
            if whole_rows:
                # The k entries of a row share its expert outputs [n, u]: broadcast them instead of copying
                # them k times (the same products and sums, element by element, in the same order).
                assert k is not None
                rows = b[::k]
                first = int(rows[0])
                if int(rows[-1]) - first == rows.numel() - 1:  # consecutive rows (a first scan): a view of F
                    F_rows = obj.F[first : first + rows.numel()].unsqueeze(1)
                else:
                    F_rows = obj.F.index_select(0, rows).unsqueeze(1)
                shape = (rows.numel(), k, 1)
                base = {t: m.view(shape + m.shape[2:]) for t, m in base.items()}
                coeff = {t: c.view(shape + (1,)) for t, c in coeff.items()}
            else:
                F_rows = obj.F.index_select(0, b)  # [E, n, u]: every expert's output on the entry's row
            new = obj.rows_loss_change(b.repeat_interleave(n), base, coeff, F_rows).view(-1, n)
            targets = (a.unsqueeze(1) * n + experts).reshape(-1)
            self.D.index_add_(0, targets, (new - self.delta.index_select(0, chunk)).reshape(-1))
            self.delta.index_copy_(0, chunk, new)

    def _update_triples(self, ids: torch.Tensor, index: torch.Tensor) -> None:
        """Exact joint change on rows where both swapped slots carry weight, minus the two single terms."""
        obj, n = self.obj, self.obj.n
        F_flat = obj.F.reshape(obj.batch * n, obj.F.shape[2])
        delta_flat = self.delta.view(-1)  # (entry, expert) -> entry * n + expert
        for lo in range(0, ids.numel(), obj.max_rows):
            chunk = ids[lo : lo + obj.max_rows]
            b, a, c = (t.index_select(0, chunk) for t in (self.tri_b, self.tri_a, self.tri_c))
            ea, ec = index.index_select(0, a), index.index_select(0, c)
            cell_a, cell_c = b * n + a, b * n + c
            F_new, F_old = F_flat.index_select(0, b * n + ec).unsqueeze(1), F_flat.index_select(0, b * n + ea).unsqueeze(1)
            coeff = {t: (w.index_select(0, cell_a) - w.index_select(0, cell_c)).view(-1, 1, 1) for t, w in self.weights.items()}
            base = {t: obj.mixtures[t].index_select(0, b).unsqueeze(1) - d * F_old for t, d in coeff.items()}
            joint = obj.rows_loss_change(b, base, coeff, F_new)
            single = delta_flat.index_select(0, self.entry_id.index_select(0, cell_a) * n + ec) + delta_flat.index_select(
                0, self.entry_id.index_select(0, cell_c) * n + ea
            )
            new = joint - single
            self.correction.index_add_(0, a * n + c, new - self.tri_value.index_select(0, chunk))
            self.tri_value.index_copy_(0, chunk, new)


def active_pairs(
    active: torch.Tensor, max_elements: int = 1 << 24, *, entries_per_row: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(b, a, c)`` with ``a < c`` and both slots active on row ``b``, ordered by ``b``, then ``a``, then ``c``.

    ``entries_per_row``: the number of active slots of every row that has any (``None``: not the same on
    every row); then the pairs are formed from each row's slots directly (the same triples, in the same
    order). Otherwise rows in chunks, to bound the memory of the ``[rows, n, n]`` mask.
    """
    batch, n = active.shape
    if entries_per_row is not None:
        b, slots = torch.nonzero(active, as_tuple=True)
        k = entries_per_row
        first, second = torch.triu_indices(k, k, offset=1, device=active.device)
        slots = slots.view(-1, k)  # each row's active slots, ascending
        rows = b.view(-1, k)[:, 0].repeat_interleave(first.numel())
        return rows, slots[:, first].reshape(-1), slots[:, second].reshape(-1)
    upper = torch.ones(n, n, dtype=torch.bool, device=active.device).triu(1)
    per_chunk = max(1, max_elements // (n * n))
    found = []
    for lo in range(0, batch, per_chunk):
        rows = active[lo : lo + per_chunk]
        b, a, c = torch.nonzero(rows.unsqueeze(2) & rows.unsqueeze(1) & upper, as_tuple=True)
        found.append((b + lo, a, c))
    if not found:  # no rows (an empty shard)
        empty = torch.zeros(0, dtype=torch.long, device=active.device)
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(parts) for parts in zip(*found))  # type: ignore[return-value]

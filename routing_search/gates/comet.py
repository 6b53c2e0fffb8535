"""COMET tree gate (Ibrahim et al. 2023): k soft binary trees whose leaves are the experts."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .annealed import AnnealedGate, BudgetAnnealing
from .protocol import GateOutput, WeightSchedule, resolve_weight
from .router import check_input_dtype
from .smooth_step import GammaAnnealing, entropy_terms, first_order_only, smooth_step_init_, stacked_logits_t

__all__ = ["COMET", "leaf_paths", "tree_levels"]

_EPS = 1e-6
_LEAF_INIT = 0.05
_LOG2E = 1.0 / math.log(2.0)


def leaf_paths(num_experts: int) -> list[tuple[int, list[tuple[int, bool]]]]:
    """Leaves of the heap-indexed tree in left-to-right order, each with its root path.

    Internal nodes are ``0 .. n-2``, leaves ``n-1 .. 2n-2``, children of ``q`` are ``2q+1`` (left) and
    ``2q+2`` (right). A path is a list of ``(node, went_left)`` from the root down.

    >>> leaf_paths(3)
    [(3, [(0, True), (1, True)]), (4, [(0, True), (1, False)]), (2, [(0, False)])]
    """
    leaves: list[tuple[int, list[tuple[int, bool]]]] = []

    def visit(q: int, path: list[tuple[int, bool]]) -> None:
        if q >= num_experts - 1:
            leaves.append((q, path))
            return
        visit(2 * q + 1, path + [(q, True)])
        visit(2 * q + 2, path + [(q, False)])

    visit(0, [])
    return leaves



def tree_levels(num_experts: int) -> tuple[tuple[int, int], ...]:
    """Heap indices ``(first, end)`` of the internal nodes of each level of the tree, root first.

    Level ``L`` holds heap nodes ``2^L - 1 .. 2^(L+1) - 2``; its internal nodes (``< n - 1``) are a
    prefix of it, and their children are the heap nodes ``2 first + 1 .. 2 end``, left and right
    alternating. Only the deepest internal level can be partial (``n`` not a power of two): its other
    nodes are leaves, which come after the leaves below it in left-to-right (expert) order.

    >>> tree_levels(16)
    ((0, 1), (1, 3), (3, 7), (7, 15))
    >>> tree_levels(5)
    ((0, 1), (1, 3), (3, 4))
    """
    levels: list[tuple[int, int]] = []
    first = 0
    while first < num_experts - 1:
        levels.append((first, min(2 * first + 1, num_experts - 1)))
        first = 2 * first + 1
    return tuple(levels)


# The tree computations below take the node (or leaf) index on dim -2 and the rows on dim -1 (``[..., n-1, R]``):
# every per-level slice is then a block of whole rows, so each operation runs over long contiguous memory
# (on the CPU, slices of a few columns of ``[R, n-1]`` cost several times as much per element).


def _reach_levels(s: torch.Tensor, levels: tuple[tuple[int, int], ...], num_experts: int) -> torch.Tensor:
    """Reach probabilities ``pi`` ``[..., n, R]`` in expert order from node outputs ``s`` ``[..., n-1, R]``, no autograd.

    Level by level in the probability domain: the left child of node ``q`` gets ``p_q s_q`` and the
    right child ``p_q - p_q s_q`` (``= p_q (1 - s_q)`` to rounding, exactly once ``s_q`` is 0 or 1),
    written straight into each level's buffer (left and right children alternate, as in the heap);
    the deepest level is written into ``pi`` itself. A leaf behind a branch of probability 0 gets
    exactly 0 (as does a product below the smallest positive float).
    """
    lead, rows = s.shape[:-2], s.shape[-1]
    pi = s.new_empty(*lead, num_experts, rows)
    parent = s.new_ones(*lead, 1, rows)
    last = len(levels) - 1
    for depth, (first, end) in enumerate(levels):
        width = end - first
        p = parent[..., :width, :]
        child = pi[..., : 2 * width, :] if depth == last else s.new_empty(*lead, 2 * width, rows)
        left = child[..., 0::2, :]
        torch.mul(p, s[..., first:end, :], out=left)
        torch.sub(p, left, out=child[..., 1::2, :])
        if depth == last and parent.shape[-2] > width:  # the leaves on the deepest internal level
            pi[..., 2 * width :, :].copy_(parent[..., width:, :])
        parent = child
    return pi


def _grad_nodes(
    h: torch.Tensor, s: torch.Tensor, levels: tuple[tuple[int, int], ...], out: torch.Tensor
) -> torch.Tensor:
    """``dL/ds`` ``[..., n-1, R]`` into ``out`` from ``h = dL/d log pi`` ``[..., n, R]`` (expert order).

    With ``H`` the sum of ``h`` over a subtree, ``dL/ds_q = H_left / s_q - H_right / (1 - s_q)``;
    the sums are formed bottom-up, level by level. A branch of probability exactly 0 passes no
    gradient (as ``d log pi / ds`` with ``log 0`` held constant): every leaf behind it has ``h = 0``
    (its weight and reach are exactly 0), and the divisor is raised to the smallest positive float,
    so ``0 / 0`` never happens; the other branch passes its gradient as usual. (Dividing by node
    outputs, never by reach probabilities, keeps this exact for any depth.)
    """
    tiny = torch.finfo(s.dtype).tiny
    lead, rows = h.shape[:-2], h.shape[-1]
    first, end = levels[-1]
    children = h[..., : 2 * (end - first), :]
    tail = h[..., 2 * (end - first) :, :]  # the leaves on the deepest internal level
    for depth in range(len(levels) - 1, -1, -1):
        first, end = levels[depth]
        width = end - first
        h_left, h_right = children[..., 0::2, :], children[..., 1::2, :]
        g, s_level = out[..., first:end, :], s[..., first:end, :]
        torch.div(h_left, torch.clamp_min(s_level, tiny, out=g), out=g)  # element by element: no aliasing issue
        g.addcdiv_(h_right, torch.rsub(s_level, 1.0).clamp_min_(tiny), value=-1.0)  # one level-sized temporary
        if depth > 0:  # H of every node on this level (2^depth = first + 1): the children of the level above
            level = h.new_empty(*lead, first + 1, rows)
            torch.add(h_left, h_right, out=level[..., :width, :])
            if first + 1 > width:
                level[..., width:, :].copy_(tail)
            children = level
    return out


def _rows_last(t: torch.Tensor) -> torch.Tensor:
    """``[..., m]`` -> ``[m, prod(...)]``: a new contiguous tensor in the layout of the tree computations."""
    return t.reshape(-1, t.shape[-1]).t().clone(memory_format=torch.contiguous_format)


class _Reach(torch.autograd.Function):
    """Reach probabilities ``[..., n]`` from node outputs ``[..., n-1]`` (:func:`_reach_levels`, :func:`_grad_nodes`)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, s: torch.Tensor, levels: tuple[tuple[int, int], ...], num_experts: int
    ) -> torch.Tensor:
        s_t = _rows_last(s)
        pi_t = _reach_levels(s_t, levels, num_experts)
        ctx.levels = levels  # type: ignore[attr-defined]
        ctx.save_for_backward(s_t, pi_t)
        return pi_t.t().reshape(*s.shape[:-1], num_experts)

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        s_t, pi_t = ctx.saved_tensors  # type: ignore[attr-defined]
        h = _rows_last(grad).mul_(pi_t)  # dL/d log pi
        grad_t = _grad_nodes(h, s_t, ctx.levels, torch.empty_like(s_t))  # type: ignore[attr-defined]
        return grad_t.t().reshape(*grad.shape[:-1], s_t.shape[0]), None, None


def _smooth_step(t: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S(t), u)``: the smooth step ``S = u (3/2 - 2 u^2) + 1/2`` of ``u = clamp(t / gamma, -1/2, 1/2)``
    (exactly 0 and 1 at the ends), in three passes (two fused multiply-adds, so it may differ from
    :func:`smooth_step` in the last bit; COMET uses it everywhere: node outputs, the soft gate, the walk).
    The slope is ``S'(t) = (3/2 - 6 u^2) / gamma`` (formed in the backward from ``u``)."""
    u = torch.div(t, gamma).clamp(-0.5, 0.5) if gamma != 1.0 else t.clamp(-0.5, 0.5)
    cubic = torch.addcmul(u.new_tensor(1.5), u, u, value=-2.0)
    tracked = torch.is_grad_enabled() and t.requires_grad  # public node outputs: differentiable
    return torch.addcmul(u.new_tensor(0.5), u, cubic, out=None if tracked else cubic), u


def _combine(
    pi: torch.Tensor, leaves: torch.Tensor, *, consume_pi: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(joint, weights, sel, mix)`` from reach probabilities and leaf logits ``[k, n, R]`` (contiguous).

    ``joint_jl = pi_jl e^{a_jl} / sum pi e^a`` ``[k, n, R]`` (one softmax over all ``k n`` scores
    ``a + log pi``); rows first: ``weights`` ``[R, n]`` its sum over the trees (contiguous),
    ``sel`` ``[R, k, n]`` each tree's own distribution and ``mix`` ``[R, k]`` each tree's share (views
    of rows-last tensors). Computed as ``pi e^a`` normalised per tree and in all (``e^a`` as
    ``2^(a log2 e)``: ``exp2`` runs several times faster than ``exp`` on the CPU): no logarithm, and
    ``pi = 0`` gives exactly 0. When a tree's unnormalised sum is below ``tiny / eps`` (its terms could
    have lost precision to underflow) or above ``max / k`` or NaN (``e^a`` overflowed), the log-domain
    softmax of ``a + log pi`` is used instead. The soft and the hard gate both use this,
    so they give the same bits. ``consume_pi=True`` (outside autograd only) lets ``joint`` be written
    over ``pi`` (one large allocation fewer; ``pi`` must not be used afterwards).
    """
    k, n, rows = leaves.shape
    grad = torch.is_grad_enabled() and (leaves.requires_grad or pi.requires_grad)  # hard(): no in-place
    num = torch.exp2(leaves * _LOG2E) * pi if grad else leaves.mul(_LOG2E).exp2_().mul_(pi)  # exp2: ~3x faster than exp
    per_tree = num.sum(dim=1)  # [k, R]
    info = torch.finfo(num.dtype)
    low, high = (float(t) for t in torch.aminmax(per_tree.detach())) if per_tree.numel() else (1.0, 1.0)
    if not (low >= info.tiny / info.eps and high <= info.max / k):  # NaN (inf * 0) compares False: falls back too
        scores = torch.log(pi) + leaves
        joint = torch.softmax(scores.view(k * n, rows), dim=0).view(k, n, rows)
        sel, mix = torch.softmax(scores, dim=1), joint.sum(dim=1)
    else:
        total = per_tree.sum(dim=0)
        joint = torch.div(num, total, out=pi) if consume_pi and not grad else num / total
        mix = per_tree / total
        sel = num / per_tree.unsqueeze(1) if grad else num.div_(per_tree.unsqueeze(1))
    weights = joint[0] if k == 1 else joint[0] + joint[1]
    for j in range(2, k):
        weights = weights + joint[j] if grad else weights.add_(joint[j])
    return joint, _row_major(weights), sel.permute(2, 0, 1), mix.t()


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``[a, (b,) R]`` -> ``[R, a, (b)]`` contiguous: the gate's output layout."""
    rows, lead = t.shape[-1], t.shape[:-1]
    return t.reshape(math.prod(lead), rows).t().clone(memory_format=torch.contiguous_format).view(rows, *lead)


class _CometGate(torch.autograd.Function):
    """The whole soft COMET gate with one hand-written backward.

    Input: the logits ``zt`` ``[k(2n-1), R]``, one column per row: rows ``:k(n-1)`` are the node
    logits (tree-major), the rest the leaf logits ``a``. Outputs (rows first) ``weights`` ``[R, n]``,
    ``selector_weights`` ``[R, k, n]``, ``selector_mix`` ``[R, k]`` and the weighted loss
    ``entropy_scale * sum_{rows, j} H(pi_j)`` (0-dim; eps inside the log; not computed, and 0, when
    ``entropy_scale`` is 0): the regulariser leaves the Function as one scalar, so no per-row tensor and
    no further autograd nodes stand between it and the gate's loss. Forward: the node outputs
    (:func:`_smooth_step`), ``pi`` level by level (:func:`_reach_levels`), then :func:`_combine`
    (the softmax over all ``k n`` scores ``a + log pi`` as ``pi e^a`` normalised: no logarithm).
    Backward: ``h = dL/d scores = dL/d log pi`` (also the leaf-logit gradient) plus the entropy's
    part gives the node gradients level by level (:func:`_grad_nodes`), times the slope. Every
    tensor is laid out rows last, so each operation runs over long contiguous memory; only
    ``weights`` is transposed back (``sel`` and ``mix`` are returned as views).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        zt: torch.Tensor,
        k: int,
        n: int,
        gamma: float,
        entropy_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # type: ignore[attr-defined]
        rows, kq = zt.shape[-1], k * (n - 1)
        levels = tree_levels(n)
        s, u = _smooth_step(zt[:kq].view(k, n - 1, rows), gamma)
        pi = _reach_levels(s, levels, n)
        ent_rows = None
        if entropy_scale != 0.0:
            # scale * -sum pi log(pi + eps), and (when a gradient is wanted) its derivative w.r.t. log pi
            # for the backward: -(pi log(pi + eps) + pi^2 / (pi + eps)) (times scale and the incoming gradient).
            pi_log, ent_rows = entropy_terms(pi, _EPS, slope=ctx.needs_input_grad[0])  # type: ignore[attr-defined]
            loss = pi_log.sum().mul_(-entropy_scale)
            del pi_log  # freed before the combination allocates: a lower peak, fewer fresh pages
        else:
            loss = zt.new_zeros(())
        joint, weights, sel, mix = _combine(pi, zt[kq:].view(k, n, rows), consume_pi=True)  # pi is spent here
        ctx.levels, ctx.gamma, ctx.entropy_scale = levels, gamma, entropy_scale  # type: ignore[attr-defined]
        ctx.save_for_backward(joint, weights, mix, sel, s, u, ent_rows)  # type: ignore[arg-type]
        return weights, sel, mix, loss

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        g_weights: torch.Tensor | None,
        g_sel: torch.Tensor | None,
        g_mix: torch.Tensor | None,
        g_loss: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        joint, weights, mix, sel, s, u, ent_rows = ctx.saved_tensors  # type: ignore[attr-defined]
        with_entropy = g_loss is not None and ent_rows is not None
        if g_weights is None and g_sel is None and g_mix is None and not with_entropy:
            return None, None, None, None, None
        k, n, rows = joint.shape
        kq = k * (n - 1)
        grad = joint.new_empty(kq + k * n, rows)
        grad_leaves = grad[kq:].view(k, n, rows)  # dL/d scores: weights and mix (joint softmax), sel (per tree)
        if g_weights is None and g_mix is None:
            grad_leaves.zero_()
        else:
            # joint * (G - <joint, G>) with G_jl = g_weights_l + g_mix_j; <joint, G> = <weights, g_weights> + <mix, g_mix>.
            inner = None
            if g_weights is not None:
                inner = (weights * g_weights).sum(dim=-1)
            if g_mix is not None:
                from_mix = (mix * g_mix).sum(dim=-1)
                inner = from_mix if inner is None else inner.add_(from_mix)
            assert inner is not None
            if g_weights is not None:
                # g_weights rows last, in the node rows of grad when they fit (scratch until _grad_nodes fills them)
                g_t = grad[:n].copy_(g_weights.t()) if kq >= n else _rows_last(g_weights)
                torch.mul(joint, g_t.sub_(inner), out=grad_leaves)
                if g_mix is not None:
                    grad_leaves.addcmul_(joint, _rows_last(g_mix).unsqueeze(1))
            else:
                assert g_mix is not None
                torch.mul(joint, _rows_last(g_mix).sub_(inner).unsqueeze(1), out=grad_leaves)
        if g_sel is not None:
            sel_t, g_sel_t = sel.permute(1, 2, 0), _rows_last(g_sel.reshape(rows, k * n)).view(k, n, rows)
            grad_leaves.addcmul_(sel_t, g_sel_t.sub_((sel_t * g_sel_t).sum(dim=1, keepdim=True)))
        h = grad_leaves
        if with_entropy:
            assert g_loss is not None
            h = torch.addcmul(grad_leaves, ent_rows, g_loss * -ctx.entropy_scale)  # type: ignore[attr-defined]
        grad_nodes = _grad_nodes(h, s, ctx.levels, grad[:kq].view(k, n - 1, rows))  # type: ignore[attr-defined]
        spent = h.view(-1)[: u.numel()].view_as(u) if h is not grad_leaves else None  # h is done with: reuse it
        slope = torch.addcmul(u.new_tensor(1.5), u, u, value=-6.0, out=spent)  # S'(t) = (3/2 - 6 u^2) / gamma
        grad_nodes.mul_(slope if ctx.gamma == 1.0 else slope.div_(ctx.gamma))  # type: ignore[attr-defined]
        return grad, None, None, None, None


class COMET(AnnealedGate):
    """COMET gate: ``k`` soft binary trees over the ``n`` experts, merged by one softmax.

    Tree ``j`` is heap-indexed: internal nodes ``0 .. n-2``, leaves ``n-1 .. 2n-2``, children of node
    ``q`` are ``2q+1`` (left) and ``2q+2`` (right); any ``n >= 2`` works (leaves may sit at different
    depths, nothing is unreachable). Node ``q`` sends ``s = S(w_jq . x + b_jq)`` to the left child and
    ``1 - s`` to the right; the reach probability ``pi_jl`` of a leaf is the product along its path.
    Each leaf has a linear logit ``a_jl(x)``. Expert weights::

        g_i(x) = sum_j pi_ji e^{a_ji} / sum_{j,l} pi_jl e^{a_jl}

    i.e. the softmax of the scores ``a + log pi`` over all ``k n`` leaves, computed in the
    probability domain (``pi`` level by level as products, then ``pi e^a`` normalised, with a log-domain fallback
    when ``e^a`` would under- or overflow), so a leaf with ``pi = 0`` gets exactly 0 and no NaN
    gradient; one hand-written backward for the whole gate.

    **Expert order**: expert ``i`` is the ``i``-th leaf in *left-to-right* order, which for ``n``
    not a power of two differs from heap order. ``leaf_order[i]`` is the heap index of expert ``i``'s
    leaf (e.g. ``(3, 4, 2)`` for ``n = 3``). Leaf parameters are stored in expert order.

    Output: ``selector_weights[b, j] = pi_j e^{a_j} / sum_l pi_jl e^{a_jl}`` (tree ``j``'s
    distribution), ``selector_mix[b, j] = sum_l pi_jl e^{a_jl} / sum_{j,l} pi e^a``, and
    ``weights = einsum('bk,bkn->bn', selector_mix, selector_weights)`` (``selector_weights`` and
    ``selector_mix`` may be non-contiguous views: they are computed with the rows last). At most ``k`` nonzeros once
    every node output is binary. Loss: ``entropy_weight * mean_batch sum_j H(pi_j)`` (eps 1e-6);
    ``entropy_weight`` may be a callable of the number of training calls so far.

    Smooth-step scale: ``gamma`` (default 1), annealed over the training budget by default
    (``anneal=BudgetAnnealing()``) so the trees end binary; the base class
    :class:`~routing_search.gates.annealed.AnnealedGate` describes the schedule and the other choices
    (an explicit ``GammaAnnealing``, ``None``, a callable ``gamma``).

    Static variant (``input_dim=None``): node and leaf logits are plain parameters. Parameters:
    ``k (2n - 1) (d + 1)`` per-example, ``k (2n - 1)`` static. Init: nodes ``U(-gamma/100, gamma/100)``,
    leaves ``U(-0.05, 0.05)``.
    """

    _expert_of_leaf: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        k: int,
        input_dim: int | None = None,
        *,
        gamma: WeightSchedule = 1.0,
        anneal: GammaAnnealing | BudgetAnnealing | None = BudgetAnnealing(),
        entropy_weight: WeightSchedule = 0.0,
        validate: bool = True,
    ) -> None:
        super().__init__(
            num_experts, k, input_dim, gamma=gamma, anneal=anneal, entropy_weight=entropy_weight, validate=validate
        )
        n, k = self.num_experts, self.num_selectors

        self.leaf_order: tuple[int, ...] = tuple(leaf for leaf, _ in leaf_paths(n))
        self._levels = tree_levels(n)
        expert_of_leaf = torch.empty(n, dtype=torch.long)  # heap leaf n-1+i -> its expert index
        for expert, leaf in enumerate(self.leaf_order):
            expert_of_leaf[leaf - (n - 1)] = expert
        self.register_buffer("_expert_of_leaf", expert_of_leaf, persistent=False)

        if input_dim is None:
            self.node_logits = nn.Parameter(torch.empty(k, n - 1))
            self.leaf_logits = nn.Parameter(torch.empty(k, n))
        else:
            self.node_weight = nn.Parameter(torch.empty(k, n - 1, input_dim))
            self.node_bias = nn.Parameter(torch.empty(k, n - 1))
            self.leaf_weight = nn.Parameter(torch.empty(k, n, input_dim))
            self.leaf_bias = nn.Parameter(torch.empty(k, n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the parameters: nodes inside the fractional region of S, leaves small."""
        with torch.no_grad():
            if self.is_static:
                smooth_step_init_(self.node_logits, self.gamma)
                self.leaf_logits.uniform_(-_LEAF_INIT, _LEAF_INIT)
            else:
                smooth_step_init_(self.node_weight, self.gamma)
                smooth_step_init_(self.node_bias, self.gamma)
                self.leaf_weight.uniform_(-_LEAF_INIT, _LEAF_INIT)
                self.leaf_bias.uniform_(-_LEAF_INIT, _LEAF_INIT)

    # ------------------------------------------------------------------ pieces
    def _logits_t(self, x: torch.Tensor | None) -> torch.Tensor:
        """All node and leaf logits, one column per row: ``[k(2n-1), R]``, rows ``:k(n-1)`` the nodes
        (tree-major), then the leaves (the layout of the tree computations). Per-example: one matrix
        product ``W x^T + b`` (:func:`stacked_logits_t`); static (``x`` ignored): one column."""
        if self.is_static:
            return torch.cat([self.node_logits.reshape(-1), self.leaf_logits.reshape(-1)]).unsqueeze(1)
        if x is None:
            raise ValueError("x is required for a per-example COMET gate (input_dim is set)")
        check_input_dtype(x, self.node_weight, self)
        k, q, d = self.node_weight.shape
        n = self.leaf_weight.shape[1]
        return stacked_logits_t(
            x,
            [self.node_weight.reshape(k * q, d), self.leaf_weight.reshape(k * n, d)],
            [self.node_bias.reshape(k * q), self.leaf_bias.reshape(k * n)],
        )

    def _logits(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Node logits ``[B, k, n-1]`` and leaf logits ``[B, k, n]`` (no batch dim: static, x None)."""
        if self.is_static:
            if x is None:
                return self.node_logits, self.leaf_logits
            batch = x.shape[0]
            return self.node_logits.expand(batch, -1, -1), self.leaf_logits.expand(batch, -1, -1)
        zt = self._logits_t(x)
        k, n = self.num_selectors, self.num_experts
        kq = k * (n - 1)
        return _row_major(zt[:kq].view(k, n - 1, -1)), _row_major(zt[kq:].view(k, n, -1))

    def _reach(self, s: torch.Tensor) -> torch.Tensor:
        """Reach probabilities ``[..., n]`` (expert order) from node outputs ``s`` ``[..., n-1]``: the product
        of the branches on each path, level by level; differentiable (a branch of probability exactly 0
        passes no gradient)."""
        return _Reach.apply(s, self._levels, self.num_experts)

    def node_outputs(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Node outputs ``S(w.x + b)`` (probability of going left): ``[k, n-1]`` or ``[B, k, n-1]``."""
        nodes, _ = self._logits(self._maybe_check(x))
        return _smooth_step(nodes, self.gamma)[0]

    def reach_probabilities(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Leaf reach probabilities ``pi`` in expert order: ``[k, n]`` (static, x None) or ``[B, k, n]``."""
        return self._reach(self.node_outputs(x))

    def is_binary(self, x: torch.Tensor | None = None, atol: float = 0.0) -> bool:
        """Whether each tree picks one leaf: every reach probability within ``atol`` of 0 or 1.

        With ``atol=0`` this holds exactly when every node on a path the tree takes is binary; nodes
        behind a branch of probability 0 do not matter (they never receive gradient, so they may
        stay fractional forever without changing the gate's output).
        """
        pi = self.reach_probabilities(x)
        return bool(((pi <= atol) | (pi >= 1 - atol)).all())

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Soft COMET gate on a batch ``x`` ``[B, input_dim]`` (any width for a static gate)."""
        x = self._check_x(x)
        calls = self._tick()
        batch = x.shape[0]
        # A static gate computes one row and broadcasts it (the same numbers, without B copies).
        zt = self._logits_t(x)
        lam = resolve_weight(self.entropy_weight, calls)
        # The batch mean of the per-row entropy (a static gate's one row stands for every row of the batch).
        scale = (lam if batch > 0 else 0.0) if self.is_static else lam / max(batch, 1)
        weights, sel, mix, loss = _CometGate.apply(zt, self.num_selectors, self.num_experts, self.gamma, scale)
        if lam == 0.0:
            loss = self._zero_loss(weights)  # not an output of the Function: no gradient flows back through it
        if self.is_static:
            weights = weights.expand(batch, -1).contiguous()
            sel = sel.expand(batch, -1, -1).contiguous()
            mix = mix.expand(batch, -1).contiguous()
        return GateOutput(weights=weights, loss=loss, selector_weights=sel, selector_mix=mix)

    def reached_leaves(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Expert (leaf, in expert order) that each tree reaches when every node decision is rounded.

        Node ``q`` sends a row left when ``S(w.x + b) > 0.5`` (ties go right). Walks the heap from
        the root, one gather per level: int64 ``[k]`` (static, ``x`` None) or ``[B, k]``.
        """
        x = self._maybe_check(x)
        k, q = self.num_selectors, self.num_experts - 1
        if self.is_static:
            expert = self._walk(self.node_logits.unsqueeze(-1)).squeeze(-1)
            return expert if x is None else expert.expand(x.shape[0], -1).contiguous()
        return self._walk(self._logits_t(x)[: k * q].view(k, q, -1)).t().contiguous()

    def _walk(self, nodes: torch.Tensor) -> torch.Tensor:
        """Leaf (expert order) reached by each tree from node logits ``[k, n-1, R]``: ``[k, R]``."""
        n = self.num_experts
        with torch.no_grad():
            right = (~(_smooth_step(nodes, self.gamma)[0] > 0.5)).to(torch.long)  # 1 where the row goes right
            node = torch.zeros(nodes.shape[0], 1, nodes.shape[2], dtype=torch.long, device=nodes.device)
            for _ in range((2 * n - 1).bit_length() - 1):  # depth of the deepest leaf
                step = 2 * node + 1 + right.gather(1, node.clamp_max(n - 2))
                node = step if n & (n - 1) == 0 else torch.where(node < n - 1, step, node)
            return self._expert_of_leaf[node.squeeze(1) - (n - 1)]

    def hard(self, x: torch.Tensor) -> GateOutput:
        """Gate with every node decision rounded to 0/1 (``s > 0.5`` goes left): at most ``k`` nonzeros.

        Each tree is walked from the root by the signs of its rounded node decisions (one gather
        per level, :meth:`reached_leaves`); the one-hot reach of the reached leaves is merged with
        the leaf logits by the soft gate's own combination. So the numbers are those of the soft
        gate with the rounded ``pi`` plugged in, bit for bit; it equals
        :meth:`forward` exactly when the node outputs are already binary. Does not advance the call
        counter; the loss is 0; gradients reach the reached leaves' logits only.
        """
        x = self._check_x(x)
        k, n, batch = self.num_selectors, self.num_experts, x.shape[0]
        zt = self._logits_t(x)  # a static gate: one column, broadcast below
        kq = k * (n - 1)
        leaves = zt[kq:].view(k, n, -1)
        expert = self._walk(zt[:kq].view(k, n - 1, -1)).unsqueeze(1)  # [k, 1, R]
        pi = leaves.new_zeros(leaves.shape).scatter_(1, expert, 1.0)
        _, weights, sel, mix = _combine(pi, leaves)
        if self.is_static:
            weights, mix, sel = weights.expand(batch, -1), mix.expand(batch, -1), sel.expand(batch, -1, -1)
            weights, mix, sel = weights.contiguous(), mix.contiguous(), sel.contiguous()
        return GateOutput(weights=weights, loss=self._zero_loss(weights), selector_weights=sel, selector_mix=mix)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.num_selectors}, input_dim={self.input_dim}, "
            f"gamma={self.gamma}"
        )

"""COMET tree gate (Ibrahim et al. 2023): k soft binary trees whose leaves are the experts."""

from __future__ import annotations


import torch
from torch import nn

from .._validation import check_num_experts_k
from .annealed import AnnealedGate
from .protocol import GateOutput, WeightSchedule, check_weight_schedule, resolve_weight
from .binary_encoding import log_factors, zero_log
from .router import check_input_dtype
from .smooth_step import GammaAnnealing, padded_linear, smooth_step, smooth_step_init_, smooth_step_slope

__all__ = ["COMET", "leaf_paths"]

_EPS = 1e-6
_LEAF_INIT = 0.05


def _batch_mean(per_example: torch.Tensor) -> torch.Tensor:
    """Mean over the leading (batch) dimension; 0 for an empty batch."""
    return per_example.sum() / max(per_example.shape[0], 1)


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



class _CometGate(torch.autograd.Function):
    """The whole soft COMET gate with one hand-written backward.

    Inputs node logits ``[..., k, n-1]`` and leaf logits ``[..., k, n]``; outputs ``weights``
    ``[..., n]``, ``selector_weights`` ``[..., k, n]``, ``selector_mix`` ``[..., k]`` and, when asked,
    the reach entropy ``sum_j H(pi_j)`` ``[...]`` (eps inside the log). Forward: ``log pi`` as one
    product of the branch log-probabilities ``(log s, log(1 - s))`` with the path matrix (``log 0``
    is :func:`zero_log`), then per tree ``lse_j = logsumexp(a_j + log pi_j)``, ``sel_j = exp(a_j +
    log pi_j - lse_j)`` and ``mix = softmax(lse)``. Same numbers as one joint softmax over all
    ``k n`` scores to rounding. Backward: a branch of probability exactly 0 passes no gradient (as
    the autograd of :func:`log_factors` gives).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        nodes: torch.Tensor,
        leaves: torch.Tensor,
        gamma: float,
        paths: torch.Tensor,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # type: ignore[attr-defined]
        s, slope = smooth_step_slope(nodes, gamma)
        right = 1 - s
        floor = zero_log(s.dtype)
        # log pi = log(s) @ P_left + log(1 - s) @ P_right (log 0 raised to zero_log by the clamp).
        q = s.shape[-1]
        log_pi = torch.log(s).clamp_min_(floor) @ paths[:q]
        log_pi = log_pi + torch.log(right).clamp_min_(floor) @ paths[q:]
        scores = leaves + log_pi
        # One joint softmax over all k n scores gives weights and mix (the same numbers as
        # :meth:`COMET.hard`, bit for bit, once pi is binary); per tree softmax for sel (not joint / mix:
        # a tree's mix may underflow to 0).
        joint = torch.softmax(scores.flatten(-2), dim=-1).view_as(scores)
        weights = joint.sum(dim=-2)
        mix = joint.sum(dim=-1)
        sel = torch.softmax(scores, dim=-1)
        ent_rows = None
        if with_entropy:
            pi = torch.exp(log_pi)
            shifted = pi + _EPS
            pi_log = pi * torch.log(shifted)
            ent = -pi_log.sum(dim=(-2, -1))
            # pi * d(-pi log(pi + eps))/dpi: the entropy's part of dL/d log pi (times its incoming gradient).
            ent_rows = pi_log + pi * pi / shifted
        else:
            ent = weights.new_zeros(weights.shape[:-1])
        ctx.save_for_backward(sel, mix, s, right, slope, paths, ent_rows)  # type: ignore[arg-type]
        return weights, sel, mix, ent

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        g_weights: torch.Tensor | None,
        g_sel: torch.Tensor | None,
        g_mix: torch.Tensor | None,
        g_ent: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        sel, mix, s, right, slope, paths, ent_rows = ctx.saved_tensors  # type: ignore[attr-defined]
        # d/d sel_j (total) and d/d mix_j (total), with weights = sum_j mix_j sel_j.
        mix_col = mix.unsqueeze(-1)
        g_sel_total = None  # sel * dL/dsel (elementwise), and its row sums
        grad_mix = g_mix
        if g_weights is not None:
            sel_gw = sel * g_weights.unsqueeze(-2)
            from_w = sel_gw.sum(dim=-1)
            grad_mix = from_w if grad_mix is None else grad_mix + from_w
            g_sel_total = sel_gw * mix_col
        if g_sel is not None:
            g_sel_total = sel * g_sel if g_sel_total is None else torch.addcmul(g_sel_total, sel, g_sel)
        # lse_j -> mix = softmax(lse); sel_j = softmax(scores_j): d/d scores = sel * (g_sel - <sel, g_sel> + d/d lse).
        coef = None
        if grad_mix is not None:
            coef = mix * (grad_mix - (mix * grad_mix).sum(dim=-1, keepdim=True))
        if g_sel_total is not None:
            # <sel_j, dL/dsel_j>: from the weights alone it is mix_j * <sel_j, g_weights> (no second pass).
            inner = mix * from_w if g_sel is None else g_sel_total.sum(dim=-1)
            coef = -inner if coef is None else coef - inner
        grad_scores = None
        if coef is not None:
            if g_sel_total is None:
                grad_scores = sel * coef.unsqueeze(-1)
            else:
                grad_scores = torch.addcmul(g_sel_total, sel, coef.unsqueeze(-1))
        grad_log_pi = grad_scores
        if g_ent is not None and ent_rows is not None:
            neg = (-g_ent).unsqueeze(-1).unsqueeze(-1)
            grad_log_pi = ent_rows * neg if grad_log_pi is None else torch.addcmul(grad_log_pi, ent_rows, neg)
        grad_nodes = None
        if grad_log_pi is not None:
            # dL/d log branch = grad_log_pi @ paths.T, computed as (paths @ grad_log_pi.T).T (several
            # times faster in that orientation on the CPU): rows :q are the left branches, q: the right.
            q = s.shape[-1]
            glog = paths @ grad_log_pi.reshape(-1, grad_log_pi.shape[-1]).t()  # [2q, rows]
            tiny = torch.finfo(s.dtype).tiny
            left = glog[:q].t() / s.reshape(-1, q).clamp_min(tiny)
            grad_nodes = ((left - glog[q:].t() / right.reshape(-1, q).clamp_min(tiny)) * slope.reshape(-1, q)).reshape(s.shape)
        return grad_nodes, grad_scores, None, None, None


class COMET(AnnealedGate):
    """COMET gate: ``k`` soft binary trees over the ``n`` experts, merged by one softmax.

    Tree ``j`` is heap-indexed: internal nodes ``0 .. n-2``, leaves ``n-1 .. 2n-2``, children of node
    ``q`` are ``2q+1`` (left) and ``2q+2`` (right); any ``n >= 2`` works (leaves may sit at different
    depths, nothing is unreachable). Node ``q`` sends ``s = S(w_jq . x + b_jq)`` to the left child and
    ``1 - s`` to the right; the reach probability ``pi_jl`` of a leaf is the product along its path.
    Each leaf has a linear logit ``a_jl(x)``. Expert weights::

        g_i(x) = sum_j pi_ji e^{a_ji} / sum_{j,l} pi_jl e^{a_jl}

    computed stably from the scores ``a + log pi`` (scores with ``pi = 0`` are masked, so they get
    exact zeros and no NaN gradients).

    **Expert order**: expert ``i`` is the ``i``-th leaf in *left-to-right* order, which for ``n``
    not a power of two differs from heap order. ``leaf_order[i]`` is the heap index of expert ``i``'s
    leaf (e.g. ``(3, 4, 2)`` for ``n = 3``). Leaf parameters are stored in expert order.

    Output: ``selector_weights[b, j] = pi_j e^{a_j} / sum_l pi_jl e^{a_jl}`` (tree ``j``'s
    distribution), ``selector_mix[b, j] = sum_l pi_jl e^{a_jl} / sum_{j,l} pi e^a``, and
    ``weights = einsum('bk,bkn->bn', selector_mix, selector_weights)``. At most ``k`` nonzeros once
    every node output is binary. Loss: ``entropy_weight * mean_batch sum_j H(pi_j)`` (eps 1e-6);
    ``entropy_weight`` may be a callable of the number of training calls so far.

    Smooth-step scale: ``gamma`` (default 1) is annealed by default (``anneal=GammaAnnealing()``):
    constant for the first 500 training calls, then geometrically down to ``gamma * 2e-3`` at call
    800, so the codes end binary (at most ``k`` experts) within an ordinary budget while the experts
    and mixing weights keep training on the hard selection. ``anneal=None`` keeps ``gamma`` fixed
    (the paper's plain form); ``GammaAnnealing.for_budget(total_steps)`` fits another budget;
    ``gamma`` may also be a callable of the training-call count. The attribute ``gamma`` is the
    value in use, computed from the saved call counter.

    Static variant (``input_dim=None``): node and leaf logits are plain parameters. Parameters:
    ``k (2n - 1) (d + 1)`` per-example, ``k (2n - 1)`` static. Init: nodes ``U(-gamma/100, gamma/100)``,
    leaves ``U(-0.05, 0.05)``.
    """

    _paths: torch.Tensor
    _expert_of_leaf: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        k: int,
        input_dim: int | None = None,
        *,
        gamma: WeightSchedule = 1.0,
        anneal: GammaAnnealing | None = GammaAnnealing(),
        entropy_weight: WeightSchedule = 0.0,
        validate: bool = True,
    ) -> None:
        n, k_checked = check_num_experts_k(num_experts, k)
        assert k_checked is not None
        k = k_checked
        super().__init__(n, input_dim, validate=validate)
        self.num_selectors = k
        self._init_gamma(gamma, anneal)
        self.entropy_weight = check_weight_schedule("entropy_weight", entropy_weight)

        self.leaf_order: tuple[int, ...] = tuple(leaf for leaf, _ in leaf_paths(n))
        # Path matrix: row q (n - 1 + q) marks the leaves whose path goes left (right) at node q, so
        # log pi = [log s, log(1 - s)] @ paths sums each leaf's log branch probabilities.
        paths = torch.zeros(2 * (n - 1), n)
        for i, (_, path) in enumerate(leaf_paths(n)):
            for q, went_left in path:
                paths[q + (0 if went_left else n - 1), i] = 1.0
        self.register_buffer("_paths", paths, persistent=False)
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
    def _logits(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Node logits ``[B, k, n-1]`` and leaf logits ``[B, k, n]`` (no batch dim: static, x None)."""
        if self.is_static:
            if x is None:
                return self.node_logits, self.leaf_logits
            batch = x.shape[0]
            return self.node_logits.expand(batch, -1, -1), self.leaf_logits.expand(batch, -1, -1)
        if x is None:
            raise ValueError("x is required for a per-example COMET gate (input_dim is set)")
        check_input_dtype(x, self.node_weight, self)
        k, q, d = self.node_weight.shape
        n = self.leaf_weight.shape[1]
        # One matrix product for all node and leaf logits.
        nodes, leaves = padded_linear(
            x,
            [self.node_weight.reshape(k * q, d), self.leaf_weight.reshape(k * n, d)],
            [self.node_bias.reshape(k * q), self.leaf_bias.reshape(k * n)],
        )
        return nodes.reshape(x.shape[0], k, q), leaves.reshape(x.shape[0], k, n)

    def _maybe_check(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else self._check_x(x)

    def _log_reach(self, s: torch.Tensor) -> torch.Tensor:
        """``log pi`` ``[..., n]`` (expert order) from node outputs ``s`` ``[..., n-1]``.

        One matrix product of the branch log-probabilities with the path matrix; a leaf behind a
        branch of probability exactly 0 gets at most ``zero_log`` (so ``exp`` gives exactly 0).
        """
        branches = torch.cat([s, 1 - s], dim=-1)  # [..., 2(n-1)]: left of every node, then right
        return log_factors(branches) @ self._paths

    def _reach(self, s: torch.Tensor) -> torch.Tensor:
        """Reach probabilities ``[..., n]`` (expert order): the product of the branches on each path."""
        return torch.exp(self._log_reach(s))

    def node_outputs(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Node outputs ``S(w.x + b)`` (probability of going left): ``[k, n-1]`` or ``[B, k, n-1]``."""
        nodes, _ = self._logits(self._maybe_check(x))
        return smooth_step(nodes, self.gamma)

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

    def _combine(
        self, log_pi: torch.Tensor, leaves: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights, selector_weights, selector_mix)`` from ``log pi`` and leaf logits ``[B, k, n]``.

        One softmax over all ``k * n`` scores ``a + log pi``. A leaf behind a zero branch has
        ``log pi <= zero_log`` (-1e6 in float32/64), so its weight underflows to exactly 0 unless
        leaf logits differ by more than about 1e6.
        """
        scores = leaves + log_pi
        joint = torch.softmax(scores.flatten(-2), dim=-1).view_as(scores)  # [B, k, n]
        weights = joint.sum(dim=-2)
        mix = joint.sum(dim=-1)
        sel = torch.softmax(scores, dim=-1)  # per tree (not joint / mix: a tree's mix may underflow to 0)
        return weights, sel, mix

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Soft COMET gate on a batch ``x`` ``[B, input_dim]`` (any width for a static gate)."""
        x = self._check_x(x)
        calls = self._tick()
        batch = x.shape[0]
        # A static gate computes one row and broadcasts it (the same numbers, without B copies).
        nodes, leaves = self._logits(None if self.is_static else x)
        lam = resolve_weight(self.entropy_weight, calls)
        weights, sel, mix, per_example = _CometGate.apply(nodes, leaves, self.gamma, self._paths.to(nodes.dtype), lam != 0.0)
        loss = self._zero_loss(weights)
        if lam != 0.0:
            if self.is_static:
                term = per_example if batch > 0 else per_example * 0.0
            else:
                term = _batch_mean(per_example)
            loss = loss + lam * term
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
        nodes, _ = self._logits(self._maybe_check(x))
        return self._walk(nodes)

    def _walk(self, nodes: torch.Tensor) -> torch.Tensor:
        """Leaf (expert order) reached by each tree from node logits ``[..., k, n-1]``."""
        n = self.num_experts
        with torch.no_grad():
            right = (~(smooth_step(nodes, self.gamma) > 0.5)).to(torch.long)  # 1 where the row goes right
            node = torch.zeros(nodes.shape[:-1], dtype=torch.long, device=nodes.device)
            for _ in range((2 * n - 1).bit_length() - 1):  # depth of the deepest leaf
                step = 2 * node + 1 + right.gather(-1, node.clamp_max(n - 2).unsqueeze(-1)).squeeze(-1)
                node = step if n & (n - 1) == 0 else torch.where(node < n - 1, step, node)
            return self._expert_of_leaf[node - (n - 1)]

    def hard(self, x: torch.Tensor) -> GateOutput:
        """Gate with every node decision rounded to 0/1 (``s > 0.5`` goes left): at most ``k`` nonzeros.

        Each tree is walked from the root by the signs of its rounded node decisions (one gather
        per level, :meth:`reached_leaves`); the reached leaves' logits are merged by the same joint
        softmax over all ``k n`` scores as the soft gate, with the other scores at ``-inf``. So the
        numbers are those of the soft gate with the rounded ``pi`` plugged in, bit for bit (up to
        leaf logits that differ by more than 1e6, where the soft gate's ``zero_log`` stops being
        ``-inf``). Equals :meth:`forward` exactly when the node outputs are already binary. Does not
        advance the call counter; the loss is 0; gradients reach the reached leaves' logits only.
        """
        x = self._check_x(x)
        nodes, leaves = self._logits(x)
        expert = self._walk(nodes).unsqueeze(-1)  # [B, k, 1]
        reached = leaves.gather(-1, expert)
        scores = torch.full_like(leaves, float("-inf")).scatter(-1, expert, reached)
        joint = torch.softmax(scores.flatten(-2), dim=-1).view_as(scores)
        weights = joint.sum(dim=-2)
        sel = torch.zeros_like(leaves).scatter_(-1, expert, 1.0)
        return GateOutput(
            weights=weights, loss=self._zero_loss(weights), selector_weights=sel, selector_mix=joint.sum(dim=-1)
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.num_selectors}, input_dim={self.input_dim}, "
            f"gamma={self.gamma}"
        )

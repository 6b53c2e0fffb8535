"""Wrap an existing PyTorch training loop with permutation local search.

    python demos/wrap_training_loop.py

Hash routing (Roller et al. 2021) sends each key (think: user id, token id) to a fixed random expert
bucket; nothing in the gate is learnable, so first-order training can only adapt the experts to
whatever bucket they were given. Which expert serves which bucket is exactly what a permutation
search changes. Here every key needs a different linear map, the experts are pretrained specialists
(one per map, e.g. loaded from an earlier run) and the random hash table hands them the wrong keys.
SGD alone has to re-train every expert for its new key; a ``LocalSearcher`` called from the ordinary
loop re-assigns them at the first search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routing_search import Hash, MoE
from routing_search.training import LocalSearcher


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target, reduction="none").mean(dim=1)


def key_maps(num_keys: int) -> torch.Tensor:
    """Each key k needs its own linear map: y = x @ A[k]."""
    return torch.randn(num_keys, 4, 2, generator=torch.Generator().manual_seed(123))


def make_data(n_rows: int, num_keys: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    x = torch.randn(n_rows, 4, generator=gen)
    key = torch.randint(0, num_keys, (n_rows,), generator=gen)
    y = torch.einsum("bd,bdo->bo", x, key_maps(num_keys)[key])
    return {"x": x, "key": key}, y


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    num_experts = 4
    gate = Hash(num_experts=num_experts, num_keys=num_experts, seed=3)  # table = a random permutation
    experts = [nn.Linear(4, 2, bias=False) for _ in range(num_experts)]
    with torch.no_grad():  # "pretrained": expert j already solves key j's map
        for expert, a in zip(experts, key_maps(num_experts)):
            expert.weight.copy_(a.t())
    model = MoE(experts, gate)
    print(f"hash table key -> expert: {gate.table.tolist()} (expert j is the specialist for key j)")

    train_inputs, train_y = make_data(4096, num_experts, gen)
    val_inputs, val_y = make_data(1024, num_experts, gen)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    searcher = LocalSearcher(model, per_example_mse, method="swap", every=100)

    for step in range(400):  # ---- the user's own loop, unchanged but for one line ----
        rows = torch.randint(0, 4096, (64,), generator=gen)
        inputs = {"x": train_inputs["x"][rows], "key": train_inputs["key"][rows]}
        out = model(**inputs)
        loss = per_example_mse(out.output, train_y[rows]).mean() + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result = searcher.step(step, (val_inputs, val_y))  # <- the added line
        if result is not None and result.nit:
            print(f"step {step:4d}: search moved {result.nit} pair(s), val loss {result.fun0:.4f} -> {result.fun:.4f}")

    with torch.no_grad():
        final = per_example_mse(model(**val_inputs).output, val_y).mean()
    print(f"final validation MSE {final:.4f}; permutation {model.permutation.get()[0].tolist()}")


if __name__ == "__main__":
    main()

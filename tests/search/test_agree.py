"""routing_search.distributed.agree_and_gather in a single process and in a group of one process (the
several-rank behaviour is tested in test_distributed.py), and the search's error type in that vocabulary."""

from __future__ import annotations

import pytest

from routing_search.distributed import RankFailedError, agree, agree_and_gather
from routing_search.search import DistributedSearchError


def test_single_process_returns_the_own_payload_or_raises_the_own_error() -> None:
    assert agree_and_gather(None, None, "counting", {"rows": 3}) == [{"rows": 3}]
    assert agree_and_gather(None, None, "counting") == [None]
    error = ValueError("no rows")
    with pytest.raises(ValueError) as caught:
        agree_and_gather(error, None, "counting", {"rows": 3})
    assert caught.value is error
    assert agree(None, None, "counting") is None
    with pytest.raises(ValueError):
        agree(error, None, "counting")


def test_error_type_must_be_a_rank_failed_error() -> None:
    with pytest.raises(TypeError, match="error_type must be RankFailedError or a subclass"):
        agree_and_gather(None, None, "counting", 1, error_type=ValueError)  # type: ignore[arg-type]
    assert issubclass(DistributedSearchError, RankFailedError) and issubclass(DistributedSearchError, RuntimeError)


def test_group_of_one_process_gathers_the_own_payload(group_of_one) -> None:
    assert agree_and_gather(None, group_of_one, "counting", [1, "a"]) == [[1, "a"]]
    with pytest.raises(KeyError):
        agree_and_gather(KeyError("own"), group_of_one, "counting", [1, "a"])
    agree(None, group_of_one, "counting")

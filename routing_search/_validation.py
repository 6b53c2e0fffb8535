"""Argument checks shared by the whole package.

Every check raises with a message that names the argument and the accepted values, so that a user
sees what to change without reading our code.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "check_int",
    "check_positive_float",
    "check_choice",
    "check_num_experts_k",
    "check_input",
    "check_finite",
    "check_no_unknown_options",
    "as_finite_array",
    "check_rng",
    "resolve_method",
    "check_permutation",
    "warn_non_finite_start",
]


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an ``int`` after checking its type and range (inclusive bounds)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and value < minimum:
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be >= {minimum}{upper}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a finite float that is > 0 (or >= 0 with ``allow_zero``)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if out < 0 or (out == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return out


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_num_experts_k(num_experts: Any, k: Any | None = None) -> tuple[int, int | None]:
    """Check ``num_experts >= 2`` and ``1 <= k <= num_experts``."""
    n = check_int("num_experts", num_experts, minimum=2)
    if k is None:
        return n, None
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an integer in [1, num_experts={n}], got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, num_experts={n}], got k={k}")
    return n, int(k)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise if ``tensor`` holds NaN or inf (floating tensors only).

    One reduction in the common case: a finite sum proves every element finite (NaN and inf propagate
    through a sum); only a non-finite sum, which large finite values can also produce, pays for the
    element-wise test.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} contains {n_bad} NaN/inf value(s); pass finite values "
            "(or switch the check off with validate=False)"
        )


def check_input(
    x: Any, input_dim: int | None, *, name: str = "x", validate: bool = True, tokens: bool = False
) -> torch.Tensor:
    """Check a gate/layer input: a 2-D tensor ``[batch, input_dim]`` (any width when ``input_dim`` is None).

    With ``tokens=True`` a token-shaped ``[batch, tokens, input_dim]`` is accepted too (exactly three
    dimensions, so that image-like input is not silently read as tokens). ``validate`` adds the NaN/inf
    scan.
    """
    shape_doc = "[batch, features] or [batch, tokens, features]" if tokens else "[batch, features]"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != 2 and not (tokens and x.dim() == 3):
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(x.shape)}")
    if input_dim is not None and x.shape[-1] != input_dim:
        raise ValueError(
            f"{name} has width {x.shape[-1]} but the module was built with input_dim={input_dim}"
        )
    if validate:
        check_finite(name, x)
    return x


def check_no_unknown_options(where: str, options: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Reject keyword options that ``where`` does not know, listing the accepted ones."""
    accepted = sorted(accepted)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"{where} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"accepted options are: {', '.join(accepted) if accepted else '(none)'}"
        )


def as_finite_array(name: str, value: Any, *, ndim: tuple[int, ...] | None = None, shape_doc: str = "") -> np.ndarray:
    """``value`` (numpy, torch or nested sequences) as a finite float64 array, checked against ``ndim``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    shape_text = f" {shape_doc}" if shape_doc else ""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array{shape_text} (numpy array or torch tensor), got {type(value).__name__}") from None
    if ndim is not None:
        if arr.ndim not in ndim:
            raise ValueError(f"{name} must have shape{shape_text}, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name} must not be empty (shape{shape_text}), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {n_bad} NaN/inf value(s); pass finite values")
    return arr


def check_rng(rng: Any, *, name: str = "rng") -> np.random.Generator:
    """The package's one way to turn ``rng`` into a ``numpy.random.Generator``.

    Accepts ``None`` (fresh entropy), a non-negative integer seed, or a ``numpy.random.Generator``
    (used as it is, so the caller's stream advances).
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)):
        raise TypeError(
            f"{name} must be None, a non-negative integer seed or a numpy.random.Generator, "
            f"got {rng!r} ({type(rng).__name__})"
        )
    if rng < 0:
        raise ValueError(f"{name} must be a non-negative integer seed, got {rng}")
    return np.random.default_rng(int(rng))


def resolve_method(
    value: Any,
    methods: Iterable[str],
    *,
    aliases: Mapping[str, str] | None = None,
    name: str = "method",
) -> str:
    """Check a method name against ``methods``; a deprecated alias maps to its new name with a warning."""
    import warnings

    methods = tuple(methods)
    if aliases and isinstance(value, str) and value in aliases:
        new = aliases[value]
        warnings.warn(f"{name}={value!r} is deprecated; use {name}={new!r}", DeprecationWarning, stacklevel=3)
        return new
    return check_choice(name, value, methods)


def check_permutation(perm: Any, n: int, *, name: str = "permutation") -> np.ndarray:
    """Return ``perm`` as an int64 numpy array after checking it is a permutation of ``range(n)``."""
    arr = perm.detach().cpu().numpy() if isinstance(perm, torch.Tensor) else np.asarray(perm)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D permutation of range({n}), got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must hold integers 0..{n - 1}, got an array of {arr.dtype}: {arr.tolist()}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integers 0..{n - 1}, got {arr.tolist()}")
        arr = arr.astype(np.int64)
    if not np.array_equal(np.sort(arr), np.arange(n)):
        raise ValueError(f"{name} must be a permutation of range({n}) (each index once), got {arr.tolist()}")
    return arr.astype(np.int64)


def warn_non_finite_start(what: str, value: float, check: str, *, unchanged: bool = True, stacklevel: int = 2) -> None:
    """The ``RuntimeWarning`` of a search whose objective is NaN/inf at its start (it searches nothing: status 2).

    ``what`` names the function and the quantity (``"local_search: the loss on data"``), ``check`` what to look
    at; ``stacklevel`` is counted from the caller, as for :func:`warnings.warn`.

    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_non_finite_start("f: the loss", float("nan"), "the data")
    >>> str(caught[0].message)
    'f: the loss is nan (not finite); nothing was searched and the model is unchanged. Check the data for NaN/inf'
    """
    unchanged_text = " and the model is unchanged" if unchanged else ""
    warnings.warn(f"{what} is {value} (not finite); nothing was searched{unchanged_text}. Check {check} for NaN/inf",
                  RuntimeWarning, stacklevel=stacklevel + 1)

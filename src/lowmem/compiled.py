"""The one cache of torch.compile wrappers around plain functions (issue 28).

`compiled(function, backend, **options)` is `torch.compile(function, backend=backend, **options)`, built
on first use and kept per (function, backend, options): the compiled optimizer updates
(lowmem.optim.adamw.compiled_function) and the compiled loss (lowmem.models.llama) share it, so a
function is wrapped once per process, whichever step or model calls it, and a test that swaps the
backend gets a fresh wrapper rather than one compiled for another backend.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_WRAPPERS: dict[tuple, Callable[..., Any]] = {}


def compiled(function: Callable[..., Any], backend: Any, **options: Any) -> Callable[..., Any]:
    """`function` through torch.compile with `backend` and `options` (one wrapper per combination)."""
    key = (function, backend, tuple(sorted(options.items())))
    wrapper = _WRAPPERS.get(key)
    if wrapper is None:
        wrapper = torch.compile(function, backend=backend, **options)
        _WRAPPERS[key] = wrapper
    return wrapper

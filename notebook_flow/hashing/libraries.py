"""Fingerprints for library objects whose pickle state is not their value.

* numpy random generators (``Generator``, ``RandomState``, bit generators) are their
  bit-generator state: the algorithm's name and its counters, which is exactly what
  decides the numbers they draw next. numpy's *global* ``RandomState`` (what
  ``np.random.rand`` draws from) is ambient state, like the ``random`` module's: it is
  hashed as a marker, not by its state, which every draw anywhere changes (the cells
  runner keys cells on ambient state separately).
* scipy.stats distributions, frozen (``norm(0, 1)``, ``poisson(3)``) or not (``norm``),
  are their distribution class, the constructor parameters, the shape/loc/scale
  arguments, and the generator they draw from (a marker for numpy's global one, the
  state of a private one). Their instance ``__dict__`` also holds vectorised methods and
  argument parsers generated per instance, which say nothing about the value.

Classes are recognised by their module and name along the MRO, never through
``sys.modules``: an instance of a class proves its module defined it, while a module
another thread is importing may be half initialised (DESIGN.md §7).
"""

from __future__ import annotations

import sys
from typing import Any

from notebook_flow.errors import UnhashableError
from notebook_flow.hashing.core import Handler, _at, _Context, _walk, _Writer
from notebook_flow.hashing.objects import _walk_class

_GENERATOR = ("numpy.random._generator", "Generator")
_RANDOM_STATE = ("numpy.random.mtrand", "RandomState")
_BIT_GENERATOR = ("numpy.random.bit_generator", "BitGenerator")
_FROZEN = ("scipy.stats._distn_infrastructure", "rv_frozen")
_DISTRIBUTION = ("scipy.stats._distn_infrastructure", "rv_generic")


def _bases(cls: type) -> set[tuple[str, str]]:
    return {(base.__module__, base.__qualname__) for base in cls.__mro__}


def resolve(cls: type) -> Handler | None:
    """A handler for ``cls`` from this module, or None."""
    module = cls.__module__.partition(".")[0]
    if module not in ("numpy", "scipy"):
        return None
    bases = _bases(cls)
    if _GENERATOR in bases or _RANDOM_STATE in bases or _BIT_GENERATOR in bases:
        return _h_random
    if _FROZEN in bases:
        return _h_frozen_distribution
    if _DISTRIBUTION in bases:
        return _h_distribution
    return None


def _is_global_random_state(rng: object) -> bool:
    mtrand = sys.modules.get("numpy.random.mtrand")
    return mtrand is not None and rng is getattr(mtrand, "_rand", None)


def _h_random(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"j"
    _walk_class(type(v), w, ctx)
    if _is_global_random_state(v):
        w.buf += b"G"  # ambient: keyed by the cells runner, restored by it
        return
    w.buf += b"S"
    if hasattr(v, "get_state"):  # RandomState: also its Box-Muller spare (has_gauss, gauss)
        state = v.get_state(legacy=False)
    elif hasattr(v, "bit_generator"):  # Generator
        state = v.bit_generator.state
    else:  # a bit generator itself
        state = v.state
    _walk(state, w, ctx)


def _walk_rng(rng: object, w: _Writer, ctx: _Context) -> None:
    try:
        _walk(rng, w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".random_state") from exc.__cause__


def _ctor_params(dist: Any) -> dict[str, Any]:
    params = dict(dist._updated_ctor_param())
    params.pop("seed", None)  # the generator is hashed on its own
    return params


def _h_distribution(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"|"
    _walk_class(type(v), w, ctx)
    _walk(_ctor_params(v), w, ctx)
    _walk_rng(v._random_state, w, ctx)


def _h_frozen_distribution(v: Any, w: _Writer, ctx: _Context) -> None:
    w.buf += b"|"
    _walk_class(type(v), w, ctx)
    dist = v.dist
    _walk_class(type(dist), w, ctx)
    _walk(_ctor_params(dist), w, ctx)
    try:
        _walk((tuple(v.args), dict(v.kwds)), w, ctx)
    except UnhashableError as exc:
        raise _at(exc, ".args") from exc.__cause__
    _walk_rng(dist._random_state, w, ctx)

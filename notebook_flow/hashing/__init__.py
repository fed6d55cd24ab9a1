"""Type-aware, stable fingerprints of Python values (xxh3-128, 32 hex chars).

``fingerprint(value)`` is what cache keys are made of: equal values of the same type give
the same digest in every process, Python run and ``PYTHONHASHSEED``; values of different
types never share one (``1``, ``1.0``, ``"1"``, ``True``, ``b"1"`` all differ)::

    >>> fingerprint((42, "abc")) == fingerprint((42, "abc"))
    True
    >>> fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    True

How it works. Every value is written to a byte stream as a one-byte type tag and a
self-delimiting body (fixed width, or length-prefixed), so the encoding is prefix-free and
a concatenation can be read back only one way. The stream goes through a streaming
xxh3-128 hasher; big buffers (numpy arrays, Arrow buffers) are handed to it as memoryviews,
never copied. Order-insensitive containers (dict, set) hash each item on its own and feed
the *sorted item digests* (a multiset), so keys of mixed types are never compared.
Arrow data is hashed as separate streams (validity, offsets, values) whose bytes do not
depend on how an array is sliced or chunked.

Decisions worth knowing (all err towards a cache *miss*, never a wrong hit):

* Floats are hashed bit for bit, except that every NaN is the same NaN; ``-0.0`` and
  ``0.0`` differ (``1 / x`` tells them apart), as they do inside arrays. ``Decimal("1.0")``
  and ``Decimal("1.00")`` differ too (their precision shows in later arithmetic).
* Arrays are hashed by their bytes: NaNs with different payloads, and garbage in the
  padding of aligned structured dtypes, make equal-looking arrays differ. A ``np.memmap``
  hashes like the ndarray it maps, so a result loaded from the cache keys like the original.
* An Arrow dictionary array is its dictionary plus its indices (chunks with different
  dictionaries are unified first): the same values encoded with another dictionary differ.
  pandas categoricals likewise hash categories (in order) plus codes.
* pydantic models hash their class and validated field values (``__dict__`` and extras,
  what their ``==`` compares), not ``model_dump()``, which flattens nested models and runs
  custom serializers.
* Objects of other classes: class identity (``notebook_flow.sourcehash.class_fingerprint``)
  plus the state pickle would save (``__reduce_ex__(4)``: ``__getstate__``, ``__dict__``,
  ``__slots__``), walked value by value -- never pickled bytes, never ``id()`` or ``repr()``.
  Objects with no visible state (open files, sockets, locks, generators, iterators,
  database connections, weakrefs, frames) raise :class:`~notebook_flow.errors.UnhashableError`
  naming where the bad part sits (``"['a'][2].conn"``).

Extend it with :func:`register_fingerprint` or a ``__notebook_flow_fingerprint__`` method.
"""

from __future__ import annotations

# core first: it imports dispatch (and through it every handler module) as its last step,
# so the dispatch table is complete before anything can call fingerprint().
from notebook_flow.hashing.core import fingerprint
from notebook_flow.hashing.dispatch import register_fingerprint

__all__ = ["fingerprint", "register_fingerprint"]

# Their public home, whatever module defines them: a function passed as a value is hashed
# by module and qualname, so moving the code must not move these keys.
fingerprint.__module__ = __name__
register_fingerprint.__module__ = __name__

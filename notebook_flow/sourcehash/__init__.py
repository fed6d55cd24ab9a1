"""Deep, stable hashes of the code a task runs: the ``TASK_SOURCE`` cache policy.

``source_components(fn)`` walks from a function to everything its behaviour depends on and
hashes each piece separately, so a cache miss can say *what* changed::

    >>> source_components(train)                                   # doctest: +SKIP
    {'source of task `train`': '9c1e…', 'source of helper `clean`': '03ab…',
     'global `THRESHOLD`': '5d7f…', 'closure `n`': 'e210…', 'class `Model`': '77c4…',
     'package `numpy`': 'a1f0…'}

What is followed, and how each piece is hashed:

* user functions (notebook cells, ``__main__``, modules outside site-packages and the
  stdlib) by their *normalized source*: ``ast.dump`` of the parsed definition with
  docstrings and the outermost decorators removed, so comments, whitespace and docstrings
  don't count. Without source (``exec``'d code, lambdas) the code object is hashed instead.
  Their globals, closures, ``mod.attr`` references and local imports are followed in turn;
* user classes by :func:`class_fingerprint` (their methods are followed too);
* third-party functions, classes and modules by the version of their package;
* the stdlib and builtins not at all;
* anything else (constants, arrays, configuration dicts, instances) by
  ``notebook_flow.hashing.fingerprint`` of its value.

How one function's code is hashed, and where code lives (user, library, stdlib), is in
``_codehash``; this package follows references and keeps the results, top to bottom:
:mod:`.components` (``source_components``, ``function_fingerprint`` and the result kept
per root function) → :mod:`.walk` (one traversal from a root, and the guards it records)
→ :mod:`.classes` (:func:`class_fingerprint`).

Two caches keep repeated calls cheap: the parse of each code object (done once), and the
whole result per root function, kept with *guards* that re-check, on every call, exactly
what the result was built from: each function's ``__code__``, each global lookup and
closure cell by identity, and the fingerprint of each mutable value (a dict or array
changed in place must change the key, so those are re-hashed on every call).

Every name is re-exported here: import it from ``notebook_flow.sourcehash``. Module state
lives once, in its own module: patch ``walk._warned`` or ``components._compute``, not a
name re-exported here.
"""

from __future__ import annotations

from .classes import _ADDRESS as _ADDRESS
from .classes import _CLASS_SKIP as _CLASS_SKIP
from .classes import _CLASSES as _CLASSES
from .classes import _DATACLASS_PARAMS as _DATACLASS_PARAMS
from .classes import _annotation_text as _annotation_text
from .classes import _attr_part as _attr_part
from .classes import _busy as _busy
from .classes import _class_ref as _class_ref
from .classes import _ClassEntry as _ClassEntry
from .classes import _compute_class_fingerprint as _compute_class_fingerprint
from .classes import _field_default as _field_default
from .classes import _function_source_defaults as _function_source_defaults
from .classes import _functions_in as _functions_in
from .classes import _FunctionType as _FunctionType
from .classes import _is_generated as _is_generated
from .classes import _method_part as _method_part
from .classes import _nested_class as _nested_class
from .classes import _pydantic_decorators_part as _pydantic_decorators_part
from .classes import class_fingerprint
from .components import _RESULT_DATA as _RESULT_DATA
from .components import _RESULTS as _RESULTS
from .components import _compute as _compute
from .components import _compute_other as _compute_other
from .components import _entry as _entry
from .components import _root as _root
from .components import function_fingerprint, source_components
from .walk import _MISSING as _MISSING
from .walk import _cell_value as _cell_value
from .walk import _Entry as _Entry
from .walk import _getattr as _getattr
from .walk import _is_task as _is_task
from .walk import _safe_fingerprint as _safe_fingerprint
from .walk import _Walk as _Walk
from .walk import _warn_unhashable as _warn_unhashable
from .walk import _warned as _warned
from .walk import _Where as _Where
from .walk import logger as logger

__all__ = ["class_fingerprint", "function_fingerprint", "source_components"]

# A function passed as a value is hashed by module and qualified name (and a class
# attribute holding a library function by "lib:module.qualname"); they keep the name they
# had when this package was the single module sourcehash.py, so no key changes.
for _fn in (class_fingerprint, function_fingerprint, source_components):
    _fn.__module__ = __name__
del _fn

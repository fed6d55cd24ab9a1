"""Running code through the IPython shell the way IPython runs a cell.

A ``%%task`` body runs as a nested cell (:func:`run_nested`: events, display, tracebacks
as usual, with IPython's ``;`` test reading the body rather than the magic line); on a hit
the cell's ``def``/``class``/``import`` statements run again (:func:`run_definitions`), so
functions are bound to the live namespace; a syntax error shows like a cell's
(:func:`syntax_error`).
"""

from __future__ import annotations

import ast
import sys
import types
from collections.abc import Callable
from typing import Any

from notebook_flow import _identity

from .analysis import CellAnalysis, _bound_by_import
from .capture import _patch_instance

__all__ = ["raise_as_plain", "run_definitions", "run_nested", "syntax_error", "user_frames"]

_DEFINITION_TYPES = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
)


def syntax_error(shell: Any, exc: SyntaxError, code: str) -> SyntaxError:
    """Show a syntax error in the body like IPython shows one in a cell: no frames."""
    exc.filename = shell.compile.cache(code, shell.execution_count)
    show = shell.showsyntaxerror
    undo: list[Callable[[], None]] = []

    def once(filename: str | None = None, running_compiled_code: bool = False) -> None:
        for step in undo:
            step()
        show(filename)

    _patch_instance(shell, "showsyntaxerror", once, undo)
    return exc


def run_nested(shell: Any, body: str, code: str | None = None) -> BaseException | None:
    """Run the cell body through the shell, as if it were a cell of its own.

    The body's traceback is not shown here: the magic re-raises the exception so the
    cell is reported failed with the user's exception (shown once, by IPython). ``code`` is
    ``shell.transform_cell(body)`` when the caller has it already.
    """
    show = shell.showtraceback

    def quiet(*args: Any, **kwargs: Any) -> None:
        if not kwargs.get("running_compiled_code"):
            show(*args, **kwargs)

    undo: list[Callable[[], None]] = []
    _patch_instance(shell, "showtraceback", quiet, undo)
    # IPython decides whether a trailing `;` hides the last value from the last cell in
    # its history, which is the `%%task` line here, not this body: let it read the body.
    hook = shell.displayhook
    if code is None:
        code = shell.transform_cell(body)
    _patch_instance(hook, "quiet", lambda: hook.semicolon_at_end_of_expression(code), undo)
    try:
        result = shell.run_cell(body, store_history=False, cell_id=_identity.current_cell())
    finally:
        for step in undo:
            step()
    error: BaseException | None = result.error_before_exec or result.error_in_exec
    return error


def run_definitions(shell: Any, analysis: CellAnalysis, restored: dict[str, Any]) -> None:
    """Re-run the cell's def/class/import statements, so functions use the live namespace.

    Compiled under a name IPython's line cache knows, so ``inspect.getsource`` (and with
    it the keys of tasks defined here) sees the same source as on a miss.
    """
    stmts: list[ast.stmt] = [
        node
        for node in analysis.tree.body
        if isinstance(node, _DEFINITION_TYPES) and _bound_by(node) <= analysis.definitions
    ]
    if not stmts:
        return
    filename = shell.compile.cache(analysis.code, shell.execution_count)
    module = ast.Module(body=stmts, type_ignores=[])
    code = compile(module, filename, "exec", shell.compile.flags, dont_inherit=True)
    exec(code, shell.user_global_ns, shell.user_ns)
    # Restored instances of a class the cell defines get the class just defined.
    classes = {n.name for n in stmts if isinstance(n, ast.ClassDef)}
    for value in restored.values():
        cls = type(value)
        if cls.__name__ in classes and shell.user_ns.get(cls.__name__) is not cls:
            try:
                value.__class__ = shell.user_ns[cls.__name__]
            except TypeError:
                pass


def _bound_by(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {_bound_by_import(a) for a in node.names}
    return (
        {node.name}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        else set()
    )


def user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Drop IPython's own ``run_code`` frame from the top of a cell's traceback."""
    while tb is not None and tb.tb_frame.f_code.co_name == "run_code":
        tb = tb.tb_next
    return tb


def raise_as_plain(shell: Any, error: BaseException) -> BaseException:
    """``error`` ready to re-raise from the magic, shown as a plain cell shows it.

    On its way out the exception passes through the ``run_cell_magic(...)`` line IPython
    made of the ``%%task`` cell, which a plain cell's traceback does not have. The next
    traceback IPython shows for this very exception starts at the body's own frames.
    """
    body_tb = user_frames(error.__traceback__)
    show = shell.showtraceback
    undo: list[Callable[[], None]] = []

    def once(exc_tuple: Any = None, *args: Any, **kwargs: Any) -> Any:
        for step in undo:
            step()
        current = exc_tuple[1] if exc_tuple else sys.exc_info()[1]
        if current is not error or not kwargs.get("running_compiled_code"):
            return show(exc_tuple, *args, **kwargs)
        kwargs["tb_offset"] = 0  # the trimmed traceback has no run_code frame to skip
        return show((type(error), error, body_tb), *args, **kwargs)

    _patch_instance(shell, "showtraceback", once, undo)
    return error.with_traceback(body_tb)

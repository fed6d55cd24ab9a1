"""Files a cell reads: a stored result holds only while they are as they were.

``df = pd.read_csv("data.csv")`` reads a file the cell's code names only as a string; an
edited ``data.csv`` must not be answered with the old frame. While a cell computes, an
audit hook (:func:`sys.addaudithook`: ``open``, ``os.listdir``, ``os.scandir``,
``glob.glob`` events, from Python and C code alike) notes the files and folders it reads;
their fingerprints (content hash up to :data:`HASH_LIMIT` bytes, size and modification time
above it; a folder by its sorted names) are stored with the result. A hit whose files
differ now is a miss that recomputes (:func:`changed`).

Library files (the Python installation, site-packages, caches and configuration under the
home folder, ``/proc``, ``/sys``, ``/dev``, compiled ``.pyc``) are not data and are left out.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import site
import stat
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["HASH_LIMIT", "changed", "fingerprints", "named_paths", "recording"]

logger = logging.getLogger("notebook_flow")

#: Files up to this size are fingerprinted by content (xxh3, GB/s); bigger ones by size
#: and modification time.
HASH_LIMIT = 256 * 1024 * 1024

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
_IMPORT_MACHINERY = frozenset(
    {
        "_frozen_importlib",
        "_frozen_importlib_external",
        "importlib._bootstrap",
        "importlib._bootstrap_external",
        "importlib.metadata",
        "importlib.resources",
        "pkgutil",
        "zipimport",
    }
)
_lock = threading.Lock()
_active: list[set[str]] = []  # the sets being filled (one per computing cell)
_installed = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _active:
        return
    try:
        _note(event, args)
    except Exception:  # an audit hook that raises fails the operation it audits: never
        logger.debug("cannot note a read (%s)", event, exc_info=True)


def _note(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        path, mode, flags = args[0], args[1], args[2] if len(args) > 2 else 0
        if isinstance(mode, str):
            if any(c in mode for c in "wax+"):
                return
        elif isinstance(flags, int) and flags & _WRITE_FLAGS:
            return
    elif event in ("os.listdir", "os.scandir"):
        if sys._getframe(1).f_globals.get("__name__") in _IMPORT_MACHINERY:
            return  # the import system caching a sys.path folder: not the cell's data
        path = args[0] if args else "."
        if path is None:
            path = "."
    else:
        return
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        return  # a file descriptor
    for found in _active:
        found.add(os.path.abspath(path))


@contextlib.contextmanager
def recording() -> Iterator[set[str]]:
    """``with recording() as paths:`` collects the paths read inside the block."""
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_hook)  # for the process's life: audit hooks can't be removed
            _installed = True
    paths: set[str] = set()
    _active.append(paths)
    try:
        yield paths
    finally:
        _active.remove(paths)


def named_paths(tree: ast.AST, values: list[Any]) -> set[str]:
    """Existing files a cell names: its string constants and its ``str`` /
    ``os.PathLike`` inputs. Readers that bypass Python's ``open`` (pyarrow's own file
    system, HDF5) are not seen by the hook; ``pd.read_parquet("data.parquet")`` is caught
    this way."""
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    found = set()
    for value in [*names, *values]:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
            continue
        with contextlib.suppress(OSError, ValueError):
            if os.path.isfile(value):  # folders only when actually listed (".", "/")
                found.add(os.path.abspath(value))
    return found


def _library_roots(*, real: bool = True) -> tuple[str, ...]:
    """The folders whose files are not data, symlinks resolved (``real=False``: as
    spelled)."""
    home = os.path.expanduser("~")
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/proc", "/sys", "/dev"}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    roots.add(site.getusersitepackages())
    for sub in (".cache", ".config", ".ipython", ".jupyter", ".local", ".matplotlib"):
        roots.add(os.path.join(home, sub))
    norm = os.path.realpath if real else os.path.abspath
    return tuple(norm(r).rstrip(os.sep) + os.sep for r in roots if r)


def _is_data(path: str, skip: tuple[str, ...], lexical: tuple[str, ...] = ()) -> bool:
    """Whether ``path`` (absolute) is data: not code, not under a folder of ``skip`` (real
    paths). ``lexical``: those folders as spelled, tested before any symlink is resolved."""
    # Lexically first: a cell that imports a library records thousands of its files, and
    # resolving each one's symlinks costs a few system calls (0.1 s for 2,000 paths).
    if path.endswith((".pyc", ".py")) or "__pycache__" in path:
        return False
    if lexical and (path + os.sep).startswith(lexical):
        return False
    real = os.path.realpath(path)
    if real.endswith((".pyc", ".py")) or "__pycache__" in real:
        return False
    return not (real + os.sep).startswith(skip) and not any(real.startswith(r) for r in skip)


def fingerprints(paths: set[str], *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{path: fingerprint}`` of the data files and folders among ``paths`` (``exclude``:
    more folders to leave out, such as the store)."""
    skip = _library_roots() + tuple(os.path.realpath(e).rstrip(os.sep) + os.sep for e in exclude)
    lexical = _library_roots(real=False) + tuple(
        os.path.abspath(e).rstrip(os.sep) + os.sep for e in exclude
    )
    out = {}
    for path in sorted(paths):
        if _is_data(path, skip, lexical):
            out[path] = _fingerprint(path)
    return out


def _fingerprint(path: str) -> str:
    import xxhash

    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return "unreadable folder"
        return "dir:" + xxhash.xxh3_128_hexdigest("\0".join(names).encode())
    if not stat.S_ISREG(st.st_mode):
        return f"special:{st.st_mode}"
    if st.st_size > HASH_LIMIT:
        return f"big:{st.st_size}:{st.st_mtime_ns}"
    h = xxhash.xxh3_128()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return "unreadable"
    return f"file:{st.st_size}:{h.hexdigest()}"


def changed(recorded: dict[str, str]) -> str | None:
    """The first recorded file or folder that differs now (None: all as they were)."""
    for path, digest in recorded.items():
        if _fingerprint(path) != digest:
            return path
    return None

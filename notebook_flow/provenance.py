"""Provenance: who made a stored result, where, with what, from which code.

Every manifest carries a small ``provenance`` mapping (strings only), covered by its
``mac`` like every other field, so it cannot be altered without the signing key:

=============  ==============================================================================
``user``       the login name of the process that computed the result
``host``       its host name
``python``     the Python version (``3.12.3``)
``packages``   ``notebook_flow`` and the libraries of the result's type and format, as
               ``name=version`` separated by spaces (``notebook_flow=0.1.0 numpy=2.1.3``)
``source``     ``module:qualname`` of a task, ``cell:NAME`` of a ``%%task`` cell
``notebook``   the notebook the process runs (when the front end says so)
``cell``       the id of the notebook cell that was running (when the front end sent one)
``git``        the commit checked out in the repository of the task's module (or of the
               notebook, or of the working folder), when there is one
=============  ==============================================================================

Cost: ``collect`` runs once per commit (the miss path), never on a hit. What does not
change in a process (user, host, Python, versions by module) is computed once. The git
commit is read from the repository's files, not by running ``git``: ``HEAD``, the branch's
ref file or ``packed-refs``; it is re-read only when one of those files changed (three
``stat`` calls, at most once a second), so a kernel that lives across ``git commit``
records the new commit.
Whether the working tree had uncommitted changes is not recorded: that needs a scan of the
tree, too slow for a commit path.

>>> p = collect({"a": 1}, "json", "mod:f")
>>> {"host", "packages", "python", "user"} <= set(p), p["source"]  # and "git" in a repository
(True, 'mod:f')
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

from notebook_flow import _identity

__all__ = ["collect", "format_provenance", "git_commit"]

#: The library of each serializer's format (its version matters to read the payload back).
_FORMAT_LIBRARIES = {
    "npy": "numpy",
    "joblib": "joblib",
    "parquet": "pyarrow",
    "arrow": "pyarrow",
    "pickle": "cloudpickle",
}
#: Bounds on what one provenance mapping may hold (a manifest is read whole).
MAX_VALUE = 512
_lock = threading.Lock()
_static: dict[str, str] | None = None
_versions: dict[str, str | None] = {}
_package_lines: dict[tuple[tuple[str, ...], str], str] = {}
#: Seconds a git commit read is reused before the repository's files are looked at again.
GIT_RECHECK = 1.0
_git_dirs: dict[str, str | None] = {}  # start folder → .git folder (None: not in a repo)
# .git folder → (files read, their mtimes then, when they were checked, the commit)
_git_heads: dict[str, tuple[tuple[str, ...], tuple[int, ...], float, str | None]] = {}


def _python_version() -> str:
    v = sys.version_info
    return f"{v.major}.{v.minor}.{v.micro}"


def _process_info() -> dict[str, str]:
    """User, host and Python version: computed once per process."""
    global _static
    if _static is None:
        import getpass  # (imports termios: only when a first result is committed)

        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no login name (a container with an unknown uid)
            user = str(os.getuid()) if hasattr(os, "getuid") else "?"
        _static = {"user": user, "host": socket.gethostname(), "python": _python_version()}
    return _static


def _version(top: str) -> str | None:
    """The version of the top-level package ``top`` (cached per process), else None.

    Read from the loaded module's ``__version__`` (the value's type comes from it, so it is
    imported), else from the installed distribution's metadata.
    """
    if top in _versions:
        return _versions[top]
    version: str | None = None
    module = sys.modules.get(top)
    found = getattr(module, "__version__", None)
    if isinstance(found, str):
        version = found
    else:
        from importlib import metadata

        with contextlib.suppress(Exception):  # not a distribution, or broken metadata
            version = metadata.version(top)
    _versions[top] = version
    return version


def _libraries(value: object, serializer: str) -> list[str]:
    """The top-level packages whose versions matter for ``value``: its type's, its
    first few items' (containers), and its format's."""
    types = {type(value)}
    if isinstance(value, dict):
        types.update(type(v) for v in list(value.values())[:8])
    elif isinstance(value, (list, tuple)):
        types.update(type(v) for v in value[:8])
    tops = {t.__module__.partition(".")[0] for t in types}
    lib = _FORMAT_LIBRARIES.get(serializer)
    if lib is not None:
        tops.add(lib)
    tops -= {"builtins", "__main__", "notebook_flow"}
    return sorted(t for t in tops if t and not t.startswith("_"))


def _packages(value: object, serializer: str) -> str:
    tops = tuple(_libraries(value, serializer))
    known = _package_lines.get((tops, serializer))
    if known is not None:
        return known
    parts = [f"notebook_flow={_version('notebook_flow') or '?'}"]
    for top in tops:
        version = _version(top)
        if version is not None:
            parts.append(f"{top}={version}")
    if len(_package_lines) > 1024:  # bounded: types are few, but a process may make many
        _package_lines.clear()
    line = _package_lines[(tops, serializer)] = " ".join(parts)
    return line


def _find_git_dir(start: str) -> str | None:
    """The ``.git`` folder of the repository holding ``start`` (cached per folder)."""
    if start in _git_dirs:
        return _git_dirs[start]
    found: str | None = None
    folder = start
    while True:
        dot_git = os.path.join(folder, ".git")
        if os.path.isdir(dot_git):
            found = dot_git
            break
        if os.path.isfile(dot_git):  # a worktree or submodule: "gitdir: <path>"
            with contextlib.suppress(OSError, ValueError):
                with open(dot_git, encoding="utf-8") as f:
                    text = f.read(4096).strip()
                if text.startswith("gitdir:"):
                    target = text[len("gitdir:") :].strip()
                    found = os.path.normpath(os.path.join(folder, target))
            break
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    _git_dirs[start] = found
    return found


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(1 << 20)
    except (OSError, ValueError):
        return None


def _common_dir(git_dir: str) -> str:
    """Where a worktree's shared refs live (``commondir``), else ``git_dir`` itself."""
    text = _read_text(os.path.join(git_dir, "commondir"))
    if text:
        return os.path.normpath(os.path.join(git_dir, text.strip()))
    return git_dir


def _resolve_head(git_dir: str) -> tuple[tuple[str, ...], str | None]:
    """(the files the answer was read from, the commit) of a repository's ``HEAD``."""
    head_path = os.path.join(git_dir, "HEAD")
    common = _common_dir(git_dir)
    packed_path = os.path.join(common, "packed-refs")
    used: tuple[str, ...] = (head_path, packed_path)
    head = (_read_text(head_path) or "").strip()
    if not head.startswith("ref:"):  # detached
        return used, head if _is_sha(head) else None
    ref = head[len("ref:") :].strip()
    if ".." in ref.split("/"):
        return used, None
    loose = tuple(os.path.join(base, *ref.split("/")) for base in dict.fromkeys((git_dir, common)))
    for ref_path in loose:
        text = _read_text(ref_path)
        if text is not None:
            sha = text.strip()
            return (*used, ref_path), sha if _is_sha(sha) else None
    used += loose  # absent now: a commit on the branch creates one of them
    for line in (_read_text(packed_path) or "").splitlines():
        sha, _, name = line.partition(" ")
        if name.strip() == ref and _is_sha(sha):
            return used, sha
    return used, None  # a branch without commits yet


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


def git_commit(start: str) -> str | None:
    """The commit checked out in the repository holding folder ``start``, else None.

    Reads the repository's files (no ``git`` process); cached, and re-read only when
    ``HEAD``, the branch's ref file or ``packed-refs`` changed (or a loose ref file
    of the branch appeared), which is looked at no more than once per ``GIT_RECHECK``
    seconds.

    >>> git_commit("/") is None or len(git_commit("/")) == 40
    True
    """
    git_dir = _find_git_dir(os.path.abspath(start))
    if git_dir is None:
        return None
    now = time.monotonic()
    cached = _git_heads.get(git_dir)
    if cached is not None:
        paths, stamps, checked, commit = cached
        if now - checked < GIT_RECHECK:
            return commit
        if tuple(_mtime(p) for p in paths) == stamps:
            _git_heads[git_dir] = (paths, stamps, now, commit)
            return commit
    paths, commit = _resolve_head(git_dir)
    _git_heads[git_dir] = (paths, tuple(_mtime(p) for p in paths), now, commit)
    return commit


def _code_folder(source: str, notebook: str | None) -> str:
    """Where the code that made the result lives: the task's module file, else the
    notebook's folder, else the working folder."""
    module_name = source.partition(":")[0]
    module = sys.modules.get(module_name) if module_name not in ("", "__main__", "cell") else None
    path = getattr(module, "__file__", None)
    if isinstance(path, str):
        return os.path.dirname(os.path.abspath(path))
    if notebook and os.path.isabs(notebook):
        return os.path.dirname(notebook)
    return os.getcwd()


def collect(value: object, serializer: str, source: str) -> dict[str, str]:
    """The provenance of a result about to be committed (see the module's table).

    ``source`` is the task identity (``module:qualname``) or the cell's (``cell:NAME``).
    Never raises: a part that cannot be determined is left out.
    """
    with _lock:  # the caches are shared by the committing threads of the process
        out = dict(_process_info())
        try:
            out["packages"] = _packages(value, serializer)
        except Exception:  # a strange type's __module__: provenance must not fail a commit
            out["packages"] = f"notebook_flow={_version('notebook_flow') or '?'}"
        out["source"] = source
        notebook = _identity.notebook_path()
        if notebook:
            out["notebook"] = notebook
        cell = _identity.current_cell()
        if cell:
            out["cell"] = cell
        with contextlib.suppress(OSError):
            commit = git_commit(_code_folder(source, notebook))
            if commit:
                out["git"] = commit
    return {k: v[:MAX_VALUE] for k, v in out.items()}


def format_provenance(provenance: dict[str, str] | None) -> str:
    """One line for people, where first: ``analysis.ipynb · cell 3 · ada@lab1 · git
    3f9a1c2 · Python 3.12.3`` (the notebook as given: callers shorten paths).

    >>> format_provenance({"user": "ada", "host": "lab1", "git": "3f9a1c2" + "0" * 33})
    'ada@lab1 · git 3f9a1c2'
    >>> format_provenance(None)
    ''
    """
    if not provenance:
        return ""
    parts = []
    where = provenance.get("notebook") or provenance.get("source") or ""
    if provenance.get("cell"):
        where = f"{where} · cell {provenance['cell']}" if where else f"cell {provenance['cell']}"
    if where:
        parts.append(where)
    who = provenance.get("user", "")
    if provenance.get("host"):
        who = f"{who}@{provenance['host']}" if who else provenance["host"]
    if who:
        parts.append(who)
    if provenance.get("git"):
        parts.append(f"git {provenance['git'][:7]}")
    if provenance.get("python"):
        parts.append(f"Python {provenance['python']}")
    return " · ".join(parts)

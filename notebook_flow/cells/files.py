"""Files a cell reads and writes: a stored result holds only while the files it read are as
they were, and a hit leaves the files it wrote as a plain run would.

Reads. ``df = pd.read_csv("data.csv")`` reads a file the cell's code names only as a
string; an edited ``data.csv`` must not be answered with the old frame. While a cell
computes, an audit hook (:func:`sys.addaudithook`: ``open``, ``os.listdir``, ``os.scandir``
events, from Python and C code alike) notes the files and folders it reads; their
fingerprints (content hash up to :data:`HASH_LIMIT` bytes, size and modification time
above it; a folder by its sorted names) are stored with the result. A hit whose files
differ now is a miss that recomputes (:func:`changed`).

Writes. The same hook notes what the cell changes: ``open`` for writing (modes ``w a x +``,
flags ``O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND``), ``os.remove``/``unlink``, ``os.rmdir``,
``shutil.rmtree``, ``os.rename``/``replace``, ``os.truncate``, ``os.mkdir``. What the cell
leaves at each path it changed is an output (:meth:`Recording.written`): a file's bytes
(stored with the result, up to :data:`WRITE_LIMIT` in all), a folder, or nothing (it
deleted the path). A hit deletes what the cell deleted, makes its folders and writes its
files back, each atomically and only where the content differs (:func:`restore`); a path
the cell spelled relative is written relative to the working folder (part of the key).
Where the old content mattered, a hit could not do what the run did, and the cell runs
uncached, naming the file: it appends to or updates a file that existed before it ran,
reads a file and then rewrites or deletes it, renames a file it did not write, lists a
folder and then adds or removes a name in it, or makes a link.

Writers that bypass Python's ``open`` (pyarrow's C++ file system, HDF5) are not seen: the
paths a cell *names* (string constants, ``str``/``os.PathLike`` inputs) are compared before
and after the run. A named file it created so is an output; a named file that existed and
changed is an output too, and its content before the run an input (the cell may have read
it first, unseen): the result holds only while the file is as it was before that run.

Which threads count. A cell's work is done by its own thread and by the threads it starts
(a thread pool, joblib's threading backend): their changes count. Threads that were
already running when the cell started (the metadata recorder, the embedded task workers,
IPython's history thread, a user's own background thread) and this package's own threads
(named ``notebook_flow-…``) do not: what they write is not the cell's result, and counting
it would make cells uncached at random (or write back a file the cell never wrote). The
cost of that choice: a pool started in an *earlier* cell and reused by this one is not the
cell's, so its writes are seen only for the named paths. Reads count from every thread (a
spurious read costs a miss, never a wrong value). Child processes are not seen, apart from
the named paths.

Not data, for reads and writes: library files (the Python installation, site-packages,
caches and configuration under the home folder, ``/proc``, ``/sys``, ``/dev``), compiled
``.pyc`` (and, for reads, ``.py``), the store; for writes also the system temp folder's own
files and the ``tmp…`` folders :mod:`tempfile` makes in it.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import os
import shutil
import site
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = [
    "HASH_LIMIT",
    "WRITE_LIMIT",
    "Recording",
    "Written",
    "changed",
    "check",
    "fingerprints",
    "named_paths",
    "recording",
    "restore",
]

logger = logging.getLogger("notebook_flow")

#: Files up to this size are fingerprinted by content (xxh3, GB/s); bigger ones by size
#: and modification time.
HASH_LIMIT = 256 * 1024 * 1024

#: The most bytes of files one cell may write and still be cached (they are stored with
#: its result and written back on a hit); a cell writing more runs uncached, naming the file.
WRITE_LIMIT = 64 * 1024 * 1024

_CHANGE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
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
_REMOVALS = (None, "remove", "rmdir", "rmtree")  # how a path was deleted, the widest last
_OWN_THREADS = "notebook_flow"  # the prefix of this package's thread names
_lock = threading.Lock()
_events = threading.RLock()  # threads of one cell change its records one at a time
_active: list[Recording] = []  # one per computing cell
_installed = False


# --------------------------------------------------------------------------- recording


@dataclasses.dataclass
class _Change:
    """What a cell did to one path."""

    name: str  # as given back: relative to the folder the cell started in, or absolute
    owned: bool = False  # its content is the cell's own now (made, truncated or deleted)
    why: str | None = None  # its old content mattered: a hit cannot do the same
    removal: str | None = None  # "remove" | "rmdir" | "rmtree": the cell deleted it
    before: str | None = None  # the result holds only while its fingerprint is this


@dataclasses.dataclass(frozen=True)
class Written:
    """What a cell left at the paths it changed: ``entries`` go into the stored result,
    ``contents`` (the files' bytes, in the order of their entries) are stored beside it.

    Entries are ``("absent", name, removal)``, ``("folder", name, removal or None)`` and
    ``("file", name, index, size, digest)``; ``index`` counts from the first part given to
    :meth:`stored`.
    """

    entries: list[tuple[Any, ...]]
    contents: list[bytes]
    preconditions: dict[str, str]  # path: the fingerprint it must have for a hit
    paths: frozenset[str]  # the absolute paths changed (not inputs of the result)

    def stored(self, first_part: int) -> list[tuple[Any, ...]]:
        """The entries with the parts' indices counted from ``first_part``."""
        return [
            (e[0], e[1], first_part + e[2], *e[3:]) if e[0] == "file" else e for e in self.entries
        ]


class Recording:
    """The files and folders one cell reads and changes while it computes (see the module
    docstring). ``named``: the paths its code names, looked at before and after the run."""

    def __init__(self, named: list[str]) -> None:
        self.reads: set[str] = set()
        self.listed: set[str] = set()  # folders listed before the cell made or emptied them
        self.thread = threading.get_ident()
        self.running = frozenset(t.ident for t in threading.enumerate())
        self.start = os.getcwd()
        self.changes: dict[str, _Change] = {}
        # The named paths as they were: (spelling, signature, fingerprint of a file).
        self.named: dict[str, tuple[str, tuple[int, ...] | None, str | None]] = {}
        for path in named:
            full = os.path.abspath(path)
            sig = _signature(full)
            digest = _fingerprint(full) if sig is not None and stat.S_ISREG(sig[0]) else None
            self.named[full] = (path, sig, digest)

    def counts(self) -> bool:
        """Whether the running thread's changes are the cell's."""
        ident = threading.get_ident()
        if ident == self.thread:
            return True
        if ident in self.running:
            return False
        return not threading.current_thread().name.startswith(_OWN_THREADS)

    # -- events (from the audit hook) ------------------------------------------------------

    def _change(self, path: str, full: str) -> _Change:
        found = self.changes.get(full)
        if found is None:
            name = path if os.path.isabs(path) else os.path.relpath(full, self.start)
            found = self.changes[full] = _Change(name)
        return found

    def _listed(self, full: str, change: _Change) -> None:
        """``full`` appears or disappears: a listing of its folder taken before is stale."""
        folder = os.path.dirname(full)
        if folder in self.listed and change.why is None:
            change.why = (
                f"it lists the folder {folder} and then adds or removes {change.name} in it, "
                "so a hit could not list what the run listed. List the folder in another cell"
            )

    def opened(self, path: str, truncates: bool, creates: bool, exclusive: bool) -> None:
        full = os.path.abspath(path)
        exists = os.path.lexists(full)
        if (exclusive and exists) or (not exists and not creates):
            return  # the open fails
        change = self._change(path, full)
        if change.owned:
            return
        if exists and not truncates:
            change.why = (
                f"it appends to or updates {change.name}, which existed before it ran, so a "
                "hit could not give its content. Write the whole file (mode 'w') to cache it"
            )
        elif exists and full in self.reads:
            change.why = _read_then(change.name, "rewrites")
        if not exists:
            # (an append that creates the file gives the same only where it is absent)
            change.before = "missing" if not truncates and not exclusive else None
            self._listed(full, change)
        change.owned = True

    def removed(self, path: str, how: str) -> None:
        full = os.path.abspath(path)
        exists = os.path.lexists(full)
        change = self._change(path, full)
        if not change.owned and full in self.reads:
            change.why = _read_then(change.name, "deletes")
        if how == "rmtree" and change.why is None:
            inside = full.rstrip(os.sep) + os.sep
            read = sorted(
                r
                for r in self.reads
                if r.startswith(inside) and not (r in self.changes and self.changes[r].owned)
            )
            if read:
                change.why = _read_then(read[0], f"deletes the folder {change.name} it is in")
        if exists:
            self._listed(full, change)
        change.owned = True
        if _REMOVALS.index(how) > _REMOVALS.index(change.removal):  # rmtree, then its rmdir
            change.removal = how

    def renamed(self, src: str, dst: str) -> None:
        full = os.path.abspath(src)
        if not os.path.lexists(full):
            return  # the rename fails
        change = self._change(src, full)
        if os.path.isdir(full) and not os.path.islink(full):
            change.why = (
                f"it renames the folder {change.name}, whose files a hit could not follow. "
                "Write them where they belong"
            )
        elif not change.owned:
            change.why = (
                f"it renames {change.name}, which existed before it ran, so a hit would "
                "need its old content. Copy it (shutil.copy) to cache this cell"
            )
        self._listed(full, change)
        change.owned, change.removal = True, change.removal or "remove"
        target = os.path.abspath(dst)
        exists = os.path.lexists(target)
        moved = self._change(dst, target)
        if not moved.owned and target in self.reads:
            moved.why = _read_then(moved.name, "replaces")
        if not exists:
            self._listed(target, moved)
        moved.owned = True

    def truncated(self, path: str, length: int) -> None:
        full = os.path.abspath(path)
        if not os.path.lexists(full):
            return
        change = self._change(path, full)
        if change.owned:
            return
        if length:
            change.why = (
                f"it truncates {change.name}, which existed before it ran, to {length} bytes, "
                "keeping part of its old content. Write the whole file to cache it"
            )
        elif full in self.reads:
            change.why = _read_then(change.name, "truncates")
        change.owned = True

    def made_folder(self, path: str) -> None:
        full = os.path.abspath(path)
        if os.path.lexists(full):
            return  # the mkdir fails (makedirs(exist_ok=True) catches it)
        change = self._change(path, full)
        self._listed(full, change)
        change.owned = True

    def linked(self, path: str) -> None:
        full = os.path.abspath(path)
        change = self._change(path, full)
        change.why = f"it makes the link {change.name}, which a hit does not make again"

    # -- after the run -----------------------------------------------------------------------

    def written(self, *, exclude: tuple[str, ...] = ()) -> Written | str:
        """What the cell left at the data paths it changed, read now; a ``str`` is the
        reason a hit could not leave the same (the cell is then not stored)."""
        skip, lexical = _skips(exclude, temp=True)
        for full, (spelled, sig, digest) in self.named.items():
            if full in self.changes or not _is_data(full, skip, lexical, code=False):
                continue
            if sig is not None and not stat.S_ISREG(sig[0]):
                continue  # a folder that was there: the files in it are what count
            now = _signature(full)
            if now == sig:
                continue
            name = spelled if os.path.isabs(spelled) else os.path.relpath(full, self.start)
            unseen = "outside Python's open (pyarrow, HDF5)"
            if now is not None and not stat.S_ISREG(now[0]):
                return f"it makes {name} {unseen}; a hit could not make it again"
            # Created: an output. Changed: also an input, as it was before the run.
            self.changes[full] = _Change(name, owned=True, before=digest)
        import xxhash

        entries: list[tuple[Any, ...]] = []
        contents: list[bytes] = []
        preconditions: dict[str, str] = {}
        paths = set()
        total = 0
        for full in sorted(self.changes):
            change = self.changes[full]
            if not _is_data(full, skip, lexical, code=False):
                continue
            if change.why is not None:
                return change.why
            paths.add(full)
            if change.before is not None:
                preconditions[full] = change.before
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                entries.append(("absent", change.name, change.removal or "remove"))
                continue
            if stat.S_ISDIR(st.st_mode):
                entries.append(("folder", change.name, change.removal))
                continue
            if not stat.S_ISREG(st.st_mode):
                return (
                    f"it leaves {change.name} as a link or a special file, which a hit "
                    "does not make again"
                )
            total += st.st_size
            if total > WRITE_LIMIT:
                return (
                    f"it writes {change.name} ({_size(st.st_size)}), and the files of a cell "
                    f"are stored up to {_size(WRITE_LIMIT)} in all. Write big files in a "
                    "cell without %%task (or a @task) to cache the rest"
                )
            with open(full, "rb") as f:
                data = f.read()
            digest = xxhash.xxh3_128_hexdigest(data)
            entries.append(("file", change.name, len(contents), len(data), digest))
            contents.append(data)
        return Written(entries, contents, preconditions, frozenset(paths))

    def inputs(self, written: Written, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
        """``{path: fingerprint}`` the result holds for: the data files and folders it read
        or names (named files as they were before the run), less those it wrote, plus the
        preconditions of what it wrote."""
        before = {
            full: digest
            for full, (_, sig, digest) in self.named.items()
            if digest is not None and full not in written.paths
        }
        found = fingerprints(
            (self.reads - written.paths) | before.keys(), exclude=exclude, known=before
        )
        found.update(written.preconditions)
        return found


def _read_then(name: str, what: str) -> str:
    return (
        f"it reads {name} and then {what} it, so its old content is an input a hit could not "
        "check. Write the result to another file to cache this cell"
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"


def _signature(path: str) -> tuple[int, ...] | None:
    """What tells a changed path (type, size, modification time, inode); None: absent."""
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)


# --------------------------------------------------------------------------- the hook


def _hook(event: str, args: tuple[Any, ...]) -> None:
    # Called for every audited event of the process (`id()` raises one: deepcopy and
    # imports raise tens of thousands), so anything else returns at the first test. Never
    # call anything audited before it: `sys._getframe` raises an event too, and called
    # for every event it recursed down to the recursion limit each time (0.6 ms an event;
    # a cell importing statsmodels took 85 s instead of 2).
    if event not in _WATCHED or not _active:
        return
    try:
        _note(event, args, sys._getframe(1) if event in _LISTINGS else None)
    except Exception:  # an audit hook that raises fails the operation it audits: never
        logger.debug("cannot note a file event (%s)", event, exc_info=True)


def _note(event: str, args: tuple[Any, ...], caller: FrameType | None) -> None:
    if event == "open":
        path = _text(args[0])
        if path is None:
            return  # a file descriptor
        how = _open_kind(args[1], args[2] if len(args) > 2 else 0)
        if how is None:
            full = os.path.abspath(path)
            for found in _active:
                found.reads.add(full)
        else:
            with _events:
                for found in _active:
                    if found.counts():
                        found.opened(path, *how)
        return
    if event in _LISTINGS:
        if caller is not None and caller.f_globals.get("__name__") in _IMPORT_MACHINERY:
            return  # the import system caching a sys.path folder: not the cell's data
        path = _text(args[0] if args and args[0] is not None else ".")
        if path is not None:
            full = os.path.abspath(path)
            for found in _active:
                found.reads.add(full)
                if not (full in found.changes and found.changes[full].owned):
                    found.listed.add(full)
        return
    if event not in _CHANGES:
        return
    recordings = [found for found in _active if found.counts()]
    if recordings:
        with _events:
            _CHANGES[event](recordings, args)


def _open_kind(mode: Any, flags: Any) -> tuple[bool, bool, bool] | None:
    """(truncates, creates, exclusive) of an open that may change the file; None: a read."""
    if isinstance(flags, int) and (flags or not isinstance(mode, str)):
        if not flags & _CHANGE_FLAGS:
            return None
        return bool(flags & os.O_TRUNC), bool(flags & os.O_CREAT), bool(flags & os.O_EXCL)
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return "w" in mode, any(c in mode for c in "wax"), "x" in mode
    return None


def _text(path: Any) -> str | None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path if isinstance(path, str) and path else None


def _relative_to_a_folder(dir_fd: Any) -> bool:
    """A path given with ``dir_fd`` (inside ``shutil.rmtree``): relative to a descriptor."""
    return dir_fd is not None and dir_fd != -1


def _on_remove(how: str) -> Any:
    def on(recordings: list[Recording], args: tuple[Any, ...]) -> None:
        path = _text(args[0])
        if path is None or (len(args) > 1 and _relative_to_a_folder(args[1])):
            return
        for found in recordings:
            found.removed(path, how)

    return on


def _on_rename(recordings: list[Recording], args: tuple[Any, ...]) -> None:
    src, dst = _text(args[0]), _text(args[1])
    if src is None or dst is None or any(_relative_to_a_folder(fd) for fd in args[2:4]):
        return
    for found in recordings:
        found.renamed(src, dst)


def _on_truncate(recordings: list[Recording], args: tuple[Any, ...]) -> None:
    path = _text(args[0])
    if path is not None and isinstance(args[1], int):
        for found in recordings:
            found.truncated(path, args[1])


def _on_mkdir(recordings: list[Recording], args: tuple[Any, ...]) -> None:
    path = _text(args[0])
    if path is not None and not (len(args) > 2 and _relative_to_a_folder(args[2])):
        for found in recordings:
            found.made_folder(path)


def _on_link(recordings: list[Recording], args: tuple[Any, ...]) -> None:
    path = _text(args[1])
    if path is not None:
        for found in recordings:
            found.linked(path)


_CHANGES: dict[str, Any] = {
    "os.remove": _on_remove("remove"),
    "os.rmdir": _on_remove("rmdir"),
    "shutil.rmtree": _on_remove("rmtree"),
    "os.rename": _on_rename,
    "os.truncate": _on_truncate,
    "os.mkdir": _on_mkdir,
    "os.symlink": _on_link,
    "os.link": _on_link,
}

_LISTINGS = frozenset({"os.listdir", "os.scandir"})
_WATCHED = frozenset({"open", *_LISTINGS, *_CHANGES})


@contextlib.contextmanager
def recording(named: list[str] | None = None) -> Iterator[Recording]:
    """``with recording(named) as found:`` records what the block reads and changes
    (``found.reads``, :meth:`Recording.written`); ``named``: paths to compare before and
    after (:func:`named_paths`)."""
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_hook)  # for the process's life: audit hooks can't be removed
            _installed = True
    found = Recording(named or [])  # (looks at the named files before the hook sees it)
    _active.append(found)
    try:
        yield found
    finally:
        _active.remove(found)


def named_paths(tree: ast.AST, values: list[Any], *, existing: bool = True) -> list[str]:
    """The paths a cell names: its string constants and its ``str`` / ``os.PathLike``
    inputs (``existing``: only those that are files now). Readers and writers that bypass
    Python's ``open`` (pyarrow's own file system, HDF5) are not seen by the hook;
    ``pd.read_parquet("data.parquet")`` is caught this way."""
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    found: dict[str, None] = {}
    for value in [*names, *values]:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
            continue
        if "\n" in value or len(found) >= 1000:
            continue  # text, not a path; or a cell of data
        with contextlib.suppress(OSError, ValueError):
            # folders only when actually listed (".", "/")
            if not existing or os.path.isfile(value):
                found[value] = None
    return list(found)


# --------------------------------------------------------------------------- on a hit


def check(entries: list[Any], load: Any) -> list[tuple[str, Any, bytes | None]]:
    """The stored changes, verified: each file's bytes (``load(index)``) must have the size
    and the content hash the (signed) result names. Raises ``ValueError`` otherwise, before
    anything is written."""
    import xxhash

    out: list[tuple[str, Any, bytes | None]] = []
    for entry in entries:
        kind, name = entry[0], entry[1]
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError("the stored result names an impossible file")
        if kind == "file":
            _, _, index, size, digest = entry
            data = load(index)
            if not isinstance(data, bytes) or len(data) != size:
                raise ValueError(f"the stored content of {name} is not what the result names")
            if xxhash.xxh3_128_hexdigest(data) != digest:
                raise ValueError(f"the stored content of {name} does not match its hash")
            out.append((kind, name, data))
        elif kind in ("absent", "folder"):
            out.append((kind, name, entry[2]))
        else:
            raise ValueError(f"the stored result names an unknown change {kind!r}")
    return out


def restore(changes: list[tuple[str, Any, Any]]) -> None:
    """Leave the paths as the cell left them (from :func:`check`): delete what it deleted,
    make its folders, write its files where their content differs. Raises ``OSError``
    where that cannot be done as the run did it (a folder it did not make is missing, a
    path is now a link): the caller runs the cell instead."""
    here = os.getcwd()
    order = {"absent": 0, "folder": 1, "file": 2}
    for kind, name, extra in sorted(changes, key=lambda c: (order[c[0]], len(c[1]), c[1])):
        path = os.path.join(here, name)
        if kind == "absent" or (kind == "folder" and extra):
            _remove(path, extra)
        if kind == "folder":
            if not os.path.isdir(path) or os.path.islink(path):
                os.mkdir(path)
        elif kind == "file":
            if os.path.islink(path):
                raise OSError(f"{path} is a symbolic link now")
            if not _same(path, extra):
                _write_file(path, extra)


def _remove(path: str, how: str) -> None:
    if not os.path.lexists(path):
        return
    if how == "rmtree" and os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif how == "rmdir" or (how == "rmtree" and os.path.isdir(path)):
        os.rmdir(path)  # (not empty, or a link: fails as the run would have)
    else:
        os.remove(path)


def _same(path: str, data: bytes) -> bool:
    import xxhash

    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
            return False
        with open(path, "rb") as f:
            return xxhash.xxh3_128_hexdigest(f.read()) == xxhash.xxh3_128_hexdigest(data)
    except OSError:
        return False


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file beside it, then a rename. An
    existing file keeps its permissions; a new one gets those ``open`` would give it."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.nf-tmp")
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- what is data


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


def _skips(
    exclude: tuple[str, ...], *, temp: bool = False
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The folders that are not data (real paths; as spelled), plus ``exclude``; with
    ``temp``, the temp folder's marker (see :func:`_is_data`)."""
    skip = _library_roots() + tuple(os.path.realpath(e).rstrip(os.sep) + os.sep for e in exclude)
    lexical = _library_roots(real=False) + tuple(
        os.path.abspath(e).rstrip(os.sep) + os.sep for e in exclude
    )
    if temp:
        skip += (_TEMP + os.path.realpath(tempfile.gettempdir()),)
    return skip, lexical


_TEMP = "\0temp:"  # marks the temp folder among the skipped roots


def _is_data(
    path: str, skip: tuple[str, ...], lexical: tuple[str, ...] = (), *, code: bool = True
) -> bool:
    """Whether ``path`` (absolute) is data: not compiled code (``code``: nor source), not
    under a folder of ``skip`` (real paths). ``lexical``: those folders as spelled, tested
    before any symlink is resolved."""
    # Lexically first: a cell that imports a library records thousands of its files, and
    # resolving each one's symlinks costs a few system calls (0.1 s for 2,000 paths).
    suffixes = (".pyc", ".py") if code else (".pyc",)
    if path.endswith(suffixes) or "__pycache__" in path:
        return False
    if lexical and (path + os.sep).startswith(lexical):
        return False
    real = os.path.realpath(path)
    if real.endswith(suffixes) or "__pycache__" in real:
        return False
    for root in skip:
        if root.startswith(_TEMP):
            if _in_temp(real, root[len(_TEMP) :]):
                return False
        elif (real + os.sep).startswith(root):
            return False
    return True


def _in_temp(real: str, temp: str) -> bool:
    """A temp file: right in the temp folder, or in a ``tmp…`` folder of it (what
    :mod:`tempfile` makes). A project kept in another folder under it is data."""
    if not real.startswith(temp.rstrip(os.sep) + os.sep):
        return False
    first, _, rest = real[len(temp.rstrip(os.sep)) + 1 :].partition(os.sep)
    return not rest or first.startswith("tmp")


def fingerprints(
    paths: set[str], *, exclude: tuple[str, ...] = (), known: dict[str, str] | None = None
) -> dict[str, str]:
    """``{path: fingerprint}`` of the data files and folders among ``paths`` (``exclude``:
    more folders to leave out, such as the store; ``known``: fingerprints taken already)."""
    skip, lexical = _skips(exclude)
    known = known or {}
    out = {}
    for path in sorted(paths):
        if _is_data(path, skip, lexical):
            out[path] = known.get(path) or _fingerprint(path)
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

"""Settings: where results live, signing, worker counts — from the environment or ``configure()``.

>>> import notebook_flow
>>> notebook_flow.configure(store="memory://demo")          # doctest: +SKIP
Settings(store='memory://demo', ...)

Environment variables (read once, on first use):

==================================  ================================================
``NOTEBOOK_FLOW_STORE``             result store URL (default ``.notebook_flow`` in the cwd)
``NOTEBOOK_FLOW_SIGNING_KEY``       the key every entry is signed with (>= 16 bytes; default:
                                    the key file, see :mod:`notebook_flow.signing`)
``NOTEBOOK_FLOW_CONFIG_DIR``        folder of that key file (default ~/.config/notebook_flow)
``NOTEBOOK_FLOW_WORKERS``           threads of the embedded worker (default 8)
``NOTEBOOK_FLOW_LOCK_LEASE``        lock lease in seconds (default 30; finite, > 0)
``NOTEBOOK_FLOW_AUTO_CELLS``        ``1``: cache every code cell as if it began with ``%%task``
``NOTEBOOK_FLOW_AUTO_MIN_SECONDS``  auto cells faster than this are not stored (``0``: all)
``NOTEBOOK_FLOW_REFRESH_CACHE``     ``1``: tasks without ``refresh_cache=`` recompute
``NOTEBOOK_FLOW_DISABLE_CACHING``   ``1``: no task computes a key, every call runs
``NOTEBOOK_FLOW_DEFAULT_NO_CACHE``  ``1``: tasks defined without a policy get NO_CACHE
``NOTEBOOK_FLOW_MAX_SIZE``          the store's quota (``20GB``): least recently used entries
                                    are evicted in the background past it (default: none)
``NOTEBOOK_FLOW_LOCK_URLS``         lock managers (``redis://…`` ``postgresql://…``, space-
                                    separated) whose locked keys eviction leaves alone
==================================  ================================================

Every value is checked when it is read or passed (:mod:`notebook_flow.options`): a bad one
raises ``ConfigurationError`` naming it and what is accepted.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any

from . import options
from .errors import ConfigurationError, ConfigurationTypeError

if TYPE_CHECKING:
    from .metadata import MetadataStore
    from .storage import ResultStore

__all__ = ["Settings", "configure", "get_metadata", "get_store", "settings", "wait_startup"]

DEFAULT_STORE = ".notebook_flow"


@dataclasses.dataclass
class Settings:
    """Process-wide defaults; every one can be overridden per task."""

    store: str = DEFAULT_STORE
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    signing_key: bytes | None = dataclasses.field(default=None, repr=False)
    workers: int = 8
    lock_lease: float = 30.0
    lock_timeout: float | None = None
    log_misses: bool = True
    background_commits: bool = True
    refresh_cache: bool = False
    disable_caching: bool = False
    default_no_cache: bool = False
    auto_cells: bool = False
    max_size: int | None = None  # bytes; see notebook_flow.lifecycle.quota

    @classmethod
    def from_env(cls) -> Settings:
        """The settings the environment variables give (each checked: see options)."""
        from .signing import env_signing_key

        env = os.environ
        # (read where it is used, cells/auto.py; refused here, not after a cell ran)
        options.env_seconds("NOTEBOOK_FLOW_AUTO_MIN_SECONDS", 0.05, zero=True)
        return cls(
            store=env.get("NOTEBOOK_FLOW_STORE") or DEFAULT_STORE,
            signing_key=env_signing_key(),  # at least 16 bytes, or a ConfigurationError
            workers=options.env_count("NOTEBOOK_FLOW_WORKERS", 8),
            lock_lease=options.env_seconds("NOTEBOOK_FLOW_LOCK_LEASE", 30.0),
            refresh_cache=_env_flag("NOTEBOOK_FLOW_REFRESH_CACHE"),
            disable_caching=_env_flag("NOTEBOOK_FLOW_DISABLE_CACHING"),
            default_no_cache=_env_flag("NOTEBOOK_FLOW_DEFAULT_NO_CACHE"),
            auto_cells=_env_flag("NOTEBOOK_FLOW_AUTO_CELLS"),
            max_size=options.env_size("NOTEBOOK_FLOW_MAX_SIZE"),
        )


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"environment variable {name}={raw!r} must be 1/true or 0/false")


_lock = threading.RLock()
_settings: Settings | None = None
#: Bumped by every configure() and reset, so objects caching a store know to look again.
generation = 0
_stores: dict[tuple[str, str, bytes | None], ResultStore] = {}
_metadata: dict[str, MetadataStore] = {}
_metadata_by_url: dict[str, MetadataStore] = {}


def settings() -> Settings:
    """The current settings (read from the environment on first use)."""
    global _settings
    if _settings is None:
        with _lock:
            if _settings is None:
                _settings = Settings.from_env()
    return _settings


def configure(
    *,
    store: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    signing_key: str | bytes | None = None,
    workers: int | None = None,
    lock_lease: float | None = None,
    lock_timeout: float | None = None,
    log_misses: bool | None = None,
    background_commits: bool | None = None,
    refresh_cache: bool | None = None,
    disable_caching: bool | None = None,
    default_no_cache: bool | None = None,
    auto_cells: bool | None = None,
    max_size: int | str | None = None,
) -> Settings:
    """Change process-wide defaults; returns the new settings.

    ``max_size`` is the store's quota (bytes, or ``"20GB"``): when a commit pushes the
    store past it, least recently used entries that are not pinned are evicted in the
    background until it is under (see :mod:`notebook_flow.lifecycle`).

    >>> configure(store="s3://bucket/cache", storage_options={"anon": False})  # doctest: +SKIP
    >>> configure(max_size="20GB")  # doctest: +SKIP
    """
    current = settings()
    changes: dict[str, Any] = {}
    if store is not None:
        if not isinstance(store, (str, os.PathLike)):
            raise ConfigurationTypeError(
                f"store={store!r} is not accepted: a path or fsspec URL (str or pathlib.Path)"
            )
        store = os.fspath(store)
        if not isinstance(store, str) or not store.strip():
            raise ConfigurationError(f"store must be a path or fsspec URL, got {store!r}")
        changes["store"] = store
    if storage_options is not None:
        if not isinstance(storage_options, dict):
            raise ConfigurationTypeError("storage_options must be a dict of fsspec options")
        changes["storage_options"] = dict(storage_options)
    if signing_key is not None:
        from .signing import check_key

        changes["signing_key"] = check_key(signing_key, "signing_key")
    if workers is not None:
        changes["workers"] = options.count("workers", workers, minimum=1)
    if lock_lease is not None:
        changes["lock_lease"] = options.seconds("lock_lease", lock_lease)
    if lock_timeout is not None:
        changes["lock_timeout"] = options.seconds("lock_timeout", lock_timeout, zero=True)
    if log_misses is not None:
        changes["log_misses"] = options.boolean("log_misses", log_misses)
    if background_commits is not None:
        changes["background_commits"] = options.boolean("background_commits", background_commits)
    for flag, value in (
        ("refresh_cache", refresh_cache),
        ("disable_caching", disable_caching),
        ("default_no_cache", default_no_cache),
    ):
        if value is not None:
            changes[flag] = options.boolean(flag, value)
    if auto_cells is not None:
        changes["auto_cells"] = options.boolean("auto_cells", auto_cells)
    if max_size is not None:
        changes["max_size"] = options.byte_size("max_size", max_size)
    global _settings, generation
    with _lock:
        _settings = dataclasses.replace(current, **changes)
        generation += 1
        return _settings


def use_store(store: str, storage_options: dict[str, Any], signing_key: bytes | None) -> None:
    """Make these the store settings of this process unless they already are (a worker
    process taking the settings a run was sent with; ``configure`` only on a change, which
    would drop the cached stores)."""
    s = settings()
    if (s.store, s.storage_options, s.signing_key) != (store, storage_options, signing_key):
        configure(store=store, storage_options=storage_options, signing_key=signing_key)


def _normalize_url(url: str) -> str:
    """Local paths become absolute, so a later ``os.chdir`` does not move the store."""
    if "://" in url or url.startswith("memory:"):
        return url
    return os.path.abspath(os.path.expanduser(url))


def get_store(url: str | ResultStore | None = None) -> ResultStore:
    """The ResultStore for ``url`` (default: the configured store), shared per process."""
    from .storage import ResultStore

    if isinstance(url, ResultStore):
        return url
    s = settings()
    target = _normalize_url(url or s.store)
    options = s.storage_options if not url or url == s.store else {}
    ident = (target, repr(sorted(options.items())), s.signing_key)
    store = _stores.get(ident)
    if store is None:
        with _lock:
            store = _stores.get(ident)
            if store is None:
                store = ResultStore(target, signing_key=s.signing_key, storage_options=options)
                _stores[ident] = store
    return store


def get_metadata(store: ResultStore | None = None) -> MetadataStore:
    """The MetadataStore indexing ``store`` (one per file and process)."""
    from .metadata import MetadataStore

    store = store if store is not None else get_store()
    meta = _metadata_by_url.get(store.url)
    if meta is not None:  # the hot path: no filesystem call
        return meta
    path = store.metadata_path()
    meta = _metadata.get(path)
    if meta is not None:
        _metadata_by_url[store.url] = meta
    if meta is None:
        with _lock:
            meta = _metadata.get(path)
            if meta is None:
                meta = MetadataStore(path)  # marks dead processes' runs CRASHED in the
                _metadata[path] = meta  # recorder's first transaction, off the caller's path
                _metadata_by_url[store.url] = meta
    return meta


def wait_startup(store: ResultStore | None = None, timeout: float = 60.0) -> None:
    """Wait until this process's queued metadata (incl. the crash check) is written."""
    get_metadata(store).flush(timeout)


def _reset_for_tests() -> None:
    """Forget settings and cached stores (used by the test suite), once the background
    commits into them have finished."""
    from .storage import behind

    behind.flush(timeout=120)
    global _settings, generation
    with _lock:
        generation += 1
        for meta in _metadata.values():
            meta.close()
        _settings = None
        _stores.clear()
        _metadata.clear()
        _metadata_by_url.clear()

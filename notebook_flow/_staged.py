"""Results staged by a transaction, and their publication at its commit: all of a store's
at once (one signed commit record, :mod:`notebook_flow.storage.group`), store by store.

Used by :mod:`notebook_flow.transactions` (which documents the behaviour).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .storage import Manifest, ResultStore
    from .tasks.call import _Call


class StagedResult:
    """A result staged in a store (a task call's, or a keyed transaction's value):
    published at commit, discarded at rollback."""

    __slots__ = ("call", "lease", "manifest", "published", "store", "value")

    def __init__(
        self,
        store: ResultStore,
        manifest: Manifest,
        value: Any,
        lease: Any = None,
        call: _Call | None = None,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.value = value
        self.lease = lease
        self.call = call
        self.published = False

    def check(self) -> None:
        """The lock's fencing check (raises ``LeaseLostError`` once the lease is lost)."""
        lease_check = getattr(self.lease, "check", None)
        if lease_check is not None:
            lease_check()

    def done(self, manifest: Manifest) -> None:
        """After the commit point: the hot cache and the index learn the entry."""
        self.published = True
        self.manifest = manifest
        if self.call is not None:
            # A mutable value has been the caller's since the call returned: the hot cache
            # must not take it as it is now (the payload was written at staging).
            from .tasks.hot import _immutable

            self.call.published(manifest, self.value, remember=_immutable(self.value))

    def discard(self) -> None:
        if not self.published:  # (a result already visible in another store stays)
            self.store.discard(self.manifest)


def publish_all(results: list[StagedResult]) -> None:
    """Make staged results visible: all of a store's at once (one commit record, see
    ``storage/group.py``), store by store; a single result by its manifest alone. Of a key
    staged twice (``refresh_cache``), the later result is published."""
    from .storage import group

    by_store: dict[str, list[StagedResult]] = {}
    for r in results:
        by_store.setdefault(r.store.url, []).append(r)
    for staged in by_store.values():
        latest = {r.manifest.key: r for r in staged}  # a key staged twice: the last one
        batch = list(latest.values())
        for r in staged:
            if latest[r.manifest.key] is not r:
                r.discard()
        store = batch[0].store
        if len(batch) == 1:
            batch[0].done(store.publish(batch[0].manifest, before_manifest=batch[0].check))
            continue

        def check(batch: list[StagedResult] = batch) -> None:
            for r in batch:
                r.check()

        final = group.publish_group(store, [r.manifest for r in batch], check=check)
        for r, manifest in zip(batch, final, strict=True):
            r.done(manifest)

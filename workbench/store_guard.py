"""What keeps a lazily opened store honest while other processes write it (docs/store.md, "Readers").

`open_store` (workbench/store.py) opens a store lazily: its arrays are read from the folder when a value is first
needed, minutes later in a notebook or a `workbench view` server. Meanwhile a writer may replace the folder
(`--overwrite`, or the rewrite of a damaged store: a new folder is swapped in under the same name) or cut entries
off its end (a resumed training run drops the probes after its checkpoint and computes them again). Read by path,
the old Dataset would then show the new folder's arrays under its own labels, or NaN (zarr's fill value for a chunk
that is gone) for entries it lists as finished. So every chunk is read through `GuardedStore`, which checks after
each read that the folder is still the one opened (its inode, and the run that made it) and still lists every
entry the reader was shown;
else the read is a `StoreChanged` error: open the store again.

Appends are fine: they add entries past the ones shown, which a reader never sees.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zarr.storage import LocalStore, WrapperStore

from workbench.errors import WorkbenchError


class StoreChanged(WorkbenchError):
    """The store was replaced, or lost entries, after it was opened: its lazily read values would be another's."""


class Watch:
    """The folder as it was opened (its inode, and the run that made it: `created_utc` and `fingerprint`, since a
    folder deleted and made again can get the freed inode) and, once set by `shown`, the entries the reader was
    shown."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()  # (a notebook's %cd must not make it another folder)
        self.inode = os.stat(self.path).st_ino
        self.made = self._made(self._attrs())
        self.attr: str | None = None
        self.entries: set[str] = set()
        self._seen = None  # (inode, mtime_ns, size) of the zarr.json last checked

    def _attrs(self) -> dict:
        try:
            return json.loads((self.path / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _made(attrs: dict) -> tuple:
        return attrs.get("created_utc"), attrs.get("fingerprint")

    def shown(self, attr: str, entries) -> None:
        self.attr, self.entries = attr, {str(e) for e in entries}

    def check(self) -> None:
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        replaced = StoreChanged(f"{self.path} was replaced after it was opened (another run's --overwrite or "
                                "rewrite of it, or a new store made in its place): its values now belong to other "
                                "entries; open it again")
        if inode is None:
            raise StoreChanged(f"{self.path} is no longer there (moved, deleted, or in the middle of another run's "
                               "--overwrite): open it again where it is now")
        if inode != self.inode:
            raise replaced
        meta = self.path / "zarr.json"
        try:
            st = os.stat(meta)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._seen:
                return
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except FileNotFoundError:  # (gone between the two looks: replaced or deleted)
            raise replaced from None
        if self._made(attrs) != self.made:
            raise replaced
        gone = self.entries - {str(e) for e in attrs.get(self.attr, [])} if self.attr else set()
        if gone:
            raise StoreChanged(f"{self.path} no longer lists {len(gone)} of the entries it showed when opened "
                               f"({', '.join(sorted(gone)[:3])}{', ...' if len(gone) > 3 else ''}: a resumed run "
                               "is computing them again); open it again")
        self._seen = stamp


class GuardedStore(WrapperStore):
    """A read-only LocalStore of `watch.path` whose every chunk read is followed by `watch.check()` (metadata reads,
    while xarray opens the store, are not checked)."""

    def __init__(self, store: LocalStore | None = None, watch: Watch | None = None, *, path: Path | None = None):
        # (absolute: a relative root is read from the current folder, and after a %cd zarr found no chunk there
        # and gave its fill value, NaN, for every cell)
        super().__init__(store if store is not None else LocalStore(str(Path(path).absolute()), read_only=True))
        self.watch = watch if watch is not None else Watch(path)

    def _with_store(self, store):
        return type(self)(store, self.watch)

    async def get(self, key, prototype, byte_range=None):
        out = await super().get(key, prototype, byte_range)
        if not key.endswith("zarr.json"):
            self.watch.check()
        return out

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        out = await super().get_partial_values(prototype, key_ranges)
        if any(not key.endswith("zarr.json") for key, _ in key_ranges):
            self.watch.check()
        return out

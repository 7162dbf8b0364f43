"""Bundles as the monitor's columnar decoder hands them over: ordinary news in `Bundle.beats`.

`Tables.split` turns a bundle's listed host entries into that form, the way an indexed delta
arrives: a per-relay id table (a new tuple object whenever it grows, as the decoder's), most
entries as rows of `Beats` in table order, the rest left listed after them.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np

from relaybeat.relay.wire import Beats, Bundle, HostEntry, LeafStatus

__all__ = ["Tables"]


class Tables:
    def __init__(self, listed_one_in: int = 4) -> None:
        self.ids: dict[str, tuple[str, ...]] = {}
        self.listed_one_in = listed_one_in  # about one entry in this many stays listed

    def split(self, bundle: Bundle) -> tuple[Bundle, Bundle]:
        """(the bundle with its entries in the order the columnar one is read, the columnar one).
        Only the top node is columnar, as on the wire."""
        listed: list[HostEntry] = []
        rows: list[HostEntry] = []
        for entry in bundle.hosts:
            mix = zlib.crc32(f"{entry.id}/{entry.seq}/{entry.age_ms}".encode())
            (listed if mix % self.listed_one_in == 0 else rows).append(entry)
        ids = self.ids.get(bundle.relay, ())
        known = set(ids)
        fresh = tuple(e.id for e in rows if e.id not in known)
        if fresh:
            ids = self.ids[bundle.relay] = ids + fresh
        at = {host: i for i, host in enumerate(ids)}
        rows.sort(key=lambda e: at[e.id])
        beats = Beats(
            ids,
            np.array([at[e.id] for e in rows], dtype=np.int64),
            np.array([-1 if e.seq is None else e.seq for e in rows], dtype=np.int64),
            np.array([e.age_ms for e in rows], dtype=np.int64),
            np.array([e.interval_ms for e in rows], dtype=np.int64),
            np.array([0 if e.status is LeafStatus.OK else 1 for e in rows], dtype=np.uint8),
        )
        return replace(bundle, hosts=(*rows, *listed)), replace(bundle, hosts=tuple(listed), beats=beats)

"""Refused associations by peer: counted by the listener, read by the web console.

The guard (:mod:`ich_node.ingest.guard`) counts every refusal and abort by peer
address, calling AE title and reason in a :class:`RefusalTally` (bounded: the
least recently refused peers are forgotten first, so a scan from many addresses
cannot grow it). The serving loop writes the tally to
``<storage.dir>/refusals/<process>.json`` (:meth:`StorageLayout.refusals_file`)
when it changed, at most every few seconds; the console
(:mod:`ich_node.web`) reads every process's file. Counts are those since the
listener started. Peer addresses and AE titles are not patient data.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ich_node.durable import write_atomic

#: (peer address, calling AE title, reason) keys remembered at most.
MAX_PEERS: Final = 1024


@dataclass(frozen=True, slots=True)
class PeerRefusals:
    """Refusals of one peer for one reason since the listener started.

    ``calling_ae`` is empty when the peer was refused before it named one
    (pending limits, TLS, deadline); ``last_at`` is seconds since the epoch.
    """

    peer: str
    calling_ae: str
    reason: str
    count: int
    last_at: float


class RefusalTally:
    """Refusals counted by peer, calling AE and reason (thread-safe, bounded)."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self.max_peers = max_peers
        self._lock = threading.Lock()
        self._counts: OrderedDict[tuple[str, str, str], tuple[int, float]] = OrderedDict()
        self.changes = 0  # bumped at each refusal: the writer writes only after a change

    def add(self, peer: str, calling_ae: str | None, reason: str, now: float | None = None) -> None:
        """Count one refusal of ``peer`` (an address) for ``reason``."""
        key = (peer, calling_ae or "", reason)
        at = time.time() if now is None else now
        with self._lock:
            count = self._counts.pop(key, (0, 0.0))[0]
            self._counts[key] = (count + 1, at)
            while len(self._counts) > self.max_peers:
                self._counts.popitem(last=False)
            self.changes += 1

    def rows(self) -> list[PeerRefusals]:
        """Every remembered key, most refused first."""
        with self._lock:
            items = list(self._counts.items())
        rows = [PeerRefusals(p, ae, r, n, at) for (p, ae, r), (n, at) in items]
        return sorted(rows, key=lambda r: (-r.count, r.peer, r.reason))


def write_refusals(path: Path, rows: list[PeerRefusals], started_at: float) -> None:
    """Write ``rows`` durably to ``path`` (JSON: ``started_at`` and ``peers``)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {"started_at": started_at, "peers": [asdict(r) for r in rows]}
    write_atomic(path, json.dumps(data, sort_keys=True).encode())


def read_refusals(folder: Path) -> list[tuple[str, float, list[PeerRefusals]]]:
    """Each process's file in ``folder``: (process name, started_at, rows).

    Unreadable or malformed files are left out (a file is replaced whole, so one
    is malformed only when something else wrote it).
    """
    out: list[tuple[str, float, list[PeerRefusals]]] = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = [
                PeerRefusals(
                    str(p["peer"]),
                    str(p["calling_ae"]),
                    str(p["reason"]),
                    int(p["count"]),
                    float(p["last_at"]),
                )
                for p in data["peers"]
            ]
            out.append((path.stem, float(data["started_at"]), rows))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out

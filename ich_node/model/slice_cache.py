"""The CNN's outputs per slice, kept by the digest of the slice's model input.

The worker's streaming read (:mod:`ich_node.service.stream_stage`) scores slices as
they arrive and keeps what the CNN said about each one here. When the series is
complete, the worker reads it from the spool as it would from scratch (the same
decoding and preprocessing, :meth:`ich_node.model.inference.Classifier.prepared_batches`)
and runs the CNN only on the slices whose model input is not here
(:meth:`ich_node.model.inference.Classifier.outputs`). The key is the SHA-256 of the
input itself, (C, size, size) float32 with its slice context, so an entry is used
only for bit-identical input: a slice re-sent with other pixels, a neighbour that
arrived later (2.5D context), another reorientation all give another key and are
scored again. The forward pass is padded so that a slice's outputs do not depend
on the batch it was in (:attr:`~ich_node.model.inference.Classifier.min_batch`):
the streamed read equals the read from scratch.

No torch here: plain numpy rows.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SliceRow:
    """The CNN stage's outputs for one slice.

    Attributes
    ----------
    logits : numpy.ndarray
        (L,) float32 CNN logits.
    embedding : numpy.ndarray
        (D,) float32 pooled last-stage features (the sequence stage's input).
    cams : numpy.ndarray or None
        (L, h, w) float32 class activation maps, or None when the head has none.
    """

    logits: np.ndarray
    embedding: np.ndarray
    cams: np.ndarray | None

    @property
    def nbytes(self) -> int:
        cams = 0 if self.cams is None else self.cams.nbytes
        return int(self.logits.nbytes + self.embedding.nbytes + cams)


def input_digest(image: np.ndarray) -> bytes:
    """The key of one slice's model input: SHA-256 of its shape, dtype and bytes.

    Parameters
    ----------
    image : numpy.ndarray
        (C, size, size) model input of one slice (float32 in [0, 1]).
    """
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.digest()


class SliceCache:
    """Outputs of the CNN by :func:`input_digest`; safe to share between threads.

    One per series being streamed: the stream stage fills it, the model stage
    reads it when the series is complete. Memory: ``nbytes`` (about 2-15 KB a
    slice: the embedding, the labels' logits and their class activation maps).
    """

    def __init__(self) -> None:
        self._rows: dict[bytes, SliceRow] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> SliceRow | None:
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                self.misses += 1
            else:
                self.hits += 1
            return row

    def peek(self, key: bytes) -> SliceRow | None:
        """The row of ``key`` without counting a hit or a miss."""
        with self._lock:
            return self._rows.get(key)

    def put(self, key: bytes, row: SliceRow) -> None:
        with self._lock:
            self._rows[key] = row

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._rows

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def retain(self, keys: Iterable[bytes]) -> None:
        """Forget every entry not in ``keys`` (slices replaced or re-scored with new context)."""
        wanted = set(keys)
        with self._lock:
            for key in [k for k in self._rows if k not in wanted]:
                del self._rows[key]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._rows.values())

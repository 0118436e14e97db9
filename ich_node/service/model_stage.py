"""The worker's second stage: the model, the alerts, the explanations.

:class:`ModelStage` runs in the thread that owns the classifier (one thread runs
a classifier's model: :class:`ich_node.model.inference.Classifier`). It classifies
a job's batches as the read stage (:mod:`ich_node.service.read_stage`) hands them
over, records the alerts as soon as the probabilities are known (before anything
slower), then makes the Grad-CAM maps, so that the results stage
(:mod:`ich_node.service.results_stage`) gets an ``ExplainedSeries`` of plain arrays
and never touches the model.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import structlog

from ich_node.config import NodeConfig
from ich_node.queue.store import Store
from ich_node.service.read_stage import END, DecodeFailed, LeasedJob
from ich_node.service.results_stage import result_options

log = structlog.get_logger(__name__)


class ModelStage:
    """Stage 2: classify, alert, explain.

    Parameters
    ----------
    config : NodeConfig
        ``notifications``, ``results`` (which slices are explained), ``storage.dir``.
    store : Store
        The node's store (alerts are recorded in it).
    classifier : ich_node.model.inference.Classifier
        The loaded model.
    streams : ich_node.service.stream_stage.Streams, optional
        The series this worker read while they arrived: the CNN's outputs kept for
        their slices are used, the other slices are run (``series.streaming``).
    lock : threading.Lock, optional
        Held while the model runs (the stream stage runs it too).
    """

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        classifier: Any,
        *,
        streams: Any = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.classifier = classifier
        self.streams = streams
        self.lock = lock if lock is not None else threading.Lock()

    def cache(self, item: LeasedJob) -> Any:
        """The streamed slices' outputs of ``item``'s series (a ``SliceCache``), or ``None``."""
        if self.streams is None:
            return None
        return self.streams.cache(item.job.series_instance_uid)

    def _reused(self, item: LeasedJob, cache: Any, hits: int) -> None:
        if cache is not None:
            item.times["streamed"] = float(cache.hits - hits)

    def alert(self, item: LeasedJob, prediction: Any) -> None:
        """Record this version's alerts as soon as its probabilities are known.

        Before Grad-CAM, heatmaps and the SR: the serving process's alert thread
        sends them at once. A failure to record fails the job (it runs again;
        an alert is never sent unrecorded, and recorded ones are not repeated).
        The moment is kept as the result time of the results ledger (``result_at``:
        when an alert went, or in shadow mode would have gone).
        """
        item.times["result_at"] = time.time()
        if not self.config.notifications:
            return
        from ich_node.delivery.outbox import prepare_alerts
        from ich_node.results.common import source_header

        t = time.perf_counter()
        job = item.job
        alerts = prepare_alerts(
            self.store,
            self.config.storage.dir,
            self.config.notifications,
            job_id=job.job_id,
            version=job.version,
            created_at=job.created_at,
            findings=dataclasses.replace(prediction.findings, version=job.version),
            header=source_header(prediction.series),
            hu_of=lambda i: prediction.hu[i],
            now=time.time(),
            mode=self.config.node.mode,
        )
        item.times["alert_s"] = time.perf_counter() - t
        if alerts:
            log.info(
                "job.alerts_recorded",
                job_id=job.job_id,
                targets=[a.target for a in alerts],
                positive=[a.positive for a in alerts],
                status=[a.status for a in alerts],
            )

    def explain(self, prediction: Any) -> Any:
        """Grad-CAM maps and the source header, as an ``ExplainedSeries``."""
        from ich_node.model.explain import explain_series

        options = result_options(self.config)
        return explain_series(
            prediction,
            self.classifier,
            negative_top_slices=options.negative_top_slices,
            explain_slices=options.needs_explanations,
            heatmaps=options.heatmaps,
            render=False,  # the results thread renders the heatmaps (with_heatmap_images)
        )

    def infer(self, item: LeasedJob) -> tuple[Any, Exception | None]:
        """Run the model on ``item``'s batches, alert, explain: (explained, None) or (None, error).

        Takes the batch stream up to its end in every case, so the read stage can
        go on with the next job.
        """
        if item.error is not None:
            return None, item.error

        ended = False

        def batches() -> Iterator[tuple[Any, Any]]:
            nonlocal ended
            while True:
                got = item.batches.get()
                if got is END:
                    ended = True
                    return
                if isinstance(got, DecodeFailed):
                    raise got.error
                yield got

        t = time.perf_counter()
        cache = self.cache(item)
        hits = 0 if cache is None else cache.hits
        try:
            with self.lock:
                prediction = self.classifier.predict_prepared(item.series, batches(), cache=cache)
            self._reused(item, cache, hits)
            if not ended:  # the model stopped early: take the rest so the reader can go on
                raise RuntimeError("the model stage did not read the whole series")
            self.alert(item, prediction)  # alert first: before heatmaps and the SR
            with self.lock:
                explained = self.explain(prediction)
        except Exception as exc:
            item.cancel.set()
            if not ended:  # let the reader finish
                item.drain()
            return None, exc
        finally:
            item.times["infer_s"] = time.perf_counter() - t
        return explained, None

    def predict(self, item: LeasedJob) -> Any:
        """One job in this thread (:meth:`ich_node.service.worker.Worker.process`): the
        classifier decodes ahead in threads of its own. Raises what the model raises."""
        t = time.perf_counter()
        cache = self.cache(item)
        hits = 0 if cache is None else cache.hits
        with self.lock:
            if cache is None:
                prediction = self.classifier.predict_series(item.series)
            else:
                prediction = self.classifier.predict_prepared(
                    item.series, self.classifier.prepared_batches(item.series), cache=cache
                )
        self._reused(item, cache, hits)
        self.alert(item, prediction)
        with self.lock:
            explained = self.explain(prediction)
        item.times["infer_s"] = time.perf_counter() - t
        return explained

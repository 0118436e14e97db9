"""The worker's third stage: write the results and bring each job to a recorded state.

:class:`ResultsStage` writes ``findings.json`` and the DICOM results
(:mod:`ich_node.results`) into a temporary folder, renames it to
``<storage.dir>/results/<job_id>`` and then, in one transaction, marks the job done
and writes its outbox (:meth:`ich_node.queue.jobs.JobQueue.complete`). A failure in
any stage is recorded here with its reason (retry or parked); a job given back at a
stop is returned to the queue here. Each job ends with one summary line in the log.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import structlog

from ich_node.config import NodeConfig, sent_in_mode, sr_classes_needed
from ich_node.durable import fsync_dir
from ich_node.imaging import SeriesRefused
from ich_node.imaging.identity import fingerprint, version_identities
from ich_node.imaging.records import one_line
from ich_node.log import PHI, job_context, redact, warning_counts
from ich_node.queue.interface import SeriesRead
from ich_node.queue.jobs import LeaseLost
from ich_node.queue.layout import SR_CLASSES_DIR, OutsideStorage, StorageLayout
from ich_node.queue.store import JobRecord, SrReference, Store
from ich_node.results.common import output_time
from ich_node.service.read_stage import LeasedJob, Leases

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What one job attempt ended with."""

    job_id: str
    state: str  # done | retry | parked | lost | queued (given back at a stop)
    n_files: int
    reason: str


def result_options(config: NodeConfig) -> Any:
    """The ``results`` section as :class:`ich_node.results.build.ResultOptions`."""
    from ich_node.results.build import ResultOptions

    return ResultOptions(
        heatmaps=config.results.heatmaps,
        negative_top_slices=config.results.negative_top_slices,
        parametric_map=config.results.parametric_map,
        key_objects=config.results.key_objects,
        sr_classes=sr_classes_needed(config.destinations),
    )


class ResultsStage:
    """Stage 3: results written, folder in place, job completed, or the failure recorded.

    Parameters
    ----------
    config : NodeConfig
        ``results``, ``storage.dir``, ``destinations``.
    store : Store
        The node's store (the previous version's SR, stage times).
    leases : Leases
        The worker's held jobs; a job reaching its recorded state is let go.
    card : ich_node.card.ModelCard
        The model's card, named in every result.
    device : str or torch.device
        Where the heatmap images are rendered (the model's device).
    """

    def __init__(
        self, config: NodeConfig, store: Store, leases: Leases, card: Any, device: Any = "cpu"
    ) -> None:
        self.config = config
        self.store = store
        self.leases = leases
        self.queue = leases.queue
        self.card = card
        self.device = device
        # ich_node.results.reports.ReportProcess: the SR encoded on another core
        # (worker_main sets it); None: in a thread of this process.
        self.reports: Any = None

    def write_outputs(
        self, job: JobRecord, explained: Any, folder: Path
    ) -> tuple[int, SrReference | None, Any]:
        """``findings.json`` and the DICOM results into ``folder``.

        Returns the number of DICOM objects written, the UIDs of the SR (which a
        later version of the series names as its predecessor) and the
        :class:`~ich_node.results.build.ResultSet` (its previews are written after
        the job is done), or ``None`` when no DICOM results were built.
        """
        from ich_node.results.build import (
            ResultsSkipped,
            build_results,
            write_sr_alternatives,
        )
        from ich_node.results.findings import write_findings

        # Dated in the study's zone (its TimezoneOffsetFromUTC), else node.timezone.
        when = output_time(
            explained.header, self.config.node.zone(), self.config.node.timezone or ""
        )
        write_findings(
            folder / "findings.json",
            dataclasses.replace(explained.findings, version=job.version, time=when),
        )
        # The SR of the latest earlier version that was done and sent: this one supersedes it.
        previous = self.store.previous_sr(job.series_instance_uid, job.version)
        previous_sr = None
        if previous is not None:
            previous_sr = pydicom.Dataset()
            previous_sr.StudyInstanceUID = previous.study_instance_uid
            previous_sr.SeriesInstanceUID = previous.series_instance_uid
            previous_sr.SOPClassUID = previous.sop_class_uid
            previous_sr.SOPInstanceUID = previous.sop_instance_uid
        # The heatmaps' pixels, all at once on the model's device (and the head region,
        # on the CPU): here, in the results thread, not in the model's, while the SR
        # is encoded beside them (build_results' render).
        from ich_node.model.heatmaps import with_heatmap_images

        options = result_options(self.config)
        device = self.device
        try:
            results = build_results(
                explained,
                self.card,
                options,
                version=job.version,
                previous_sr=previous_sr,
                when=when,
                render=lambda e: with_heatmap_images(e, options.heatmaps, device),
                previews=False,  # written after the hand-over: write_previews
                reports=self.reports,
                # folder is the job's temporary results folder, renamed into place
                # after: each heatmap is written as soon as it is encoded.
                out_dir=folder / "outbox",
            )
        except ResultsSkipped as exc:
            log.info("job.results_skipped", job_id=job.job_id, reason=str(exc))
            return 0, None, None
        write_sr_alternatives(results, folder / SR_CLASSES_DIR)
        sr = results.sr
        reference = SrReference(
            str(sr.StudyInstanceUID),
            str(sr.SeriesInstanceUID),
            str(sr.SOPClassUID),
            str(sr.SOPInstanceUID),
        )
        return len(results.datasets()), reference, results

    def ledger_row(
        self,
        job: JobRecord,
        explained: Any,
        sr: SrReference | None,
        result_at: float | None = None,
    ) -> SeriesRead:
        """This version's row of the results ledger (written when the job completes).

        The content fingerprint covers every instance the version read; the slices
        already decoded to HU are not decoded again (:func:`version_identities`).
        """
        uid = job.series_instance_uid
        # This version's instances, as the read stage took them (all when clocks disagree).
        known = self.store.instance_identities(uid, received_by=job.created_at)
        known = known or self.store.instance_identities(uid)
        identities = version_identities(
            [i.path for i in known], explained.series.slices, explained.hu
        )
        # Kept with each instance: a later re-send is compared without decoding these again.
        self.store.set_content_ids(identities)
        digests = [i.digest for i in known]
        findings = explained.findings
        accession = explained.header.get("AccessionNumber", "")
        return SeriesRead(
            job_id=job.job_id,
            study_instance_uid=findings.study_instance_uid,
            series_instance_uid=uid,
            accession_number="" if accession is None else str(accession).strip(),
            version=job.version,
            content_fingerprint=fingerprint(identities.values()),
            n_instances=len(identities),
            model_name=findings.model.name,
            model_version=findings.model.version,
            model_sha256=findings.model.sha256,
            thresholds={k: float(f.threshold) for k, f in findings.series.items()},
            probabilities={k: float(f.probability) for k, f in findings.series.items()},
            positive_labels=findings.positive_labels,
            coverage_complete=bool(findings.coverage_complete),
            n_notes=len(findings.notes),
            sr_series_instance_uid="" if sr is None else sr.series_instance_uid,
            sr_sop_class_uid="" if sr is None else sr.sop_class_uid,
            sr_sop_instance_uid="" if sr is None else sr.sop_instance_uid,
            cause=job.cause,
            bytes_fingerprint=fingerprint(digests) if all(digests) else "",
            threshold_sources={k: str(f.threshold_source) for k, f in findings.series.items()},
            mode=self.config.node.mode,
            result_at=result_at,
        )

    def finish(
        self,
        item: LeasedJob,
        explained: Any,
        error: Exception | None,
        clock: Callable[[], float],
    ) -> JobOutcome:
        """Bring a job to a recorded state (done, retry, parked or lost); never raises."""
        job, times = item.job, item.times
        layout = StorageLayout(self.config.storage.dir)
        # Named by the job id from the store: a plain name only, else refused below.
        tmp = layout.results / f".refused.{os.getpid()}.tmp"
        try:
            final = layout.results_dir(job.job_id)
            tmp = layout.results_temp(job.job_id, os.getpid())
            if error is not None:
                raise error
            t = time.perf_counter()
            # Never written through a link planted for results/ (OutsideStorage).
            layout.results.mkdir(mode=0o700, parents=True, exist_ok=True)
            layout.own_dir(layout.results)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            n_files, sr, results = self.write_outputs(job, explained, tmp)
            times["results_s"] = time.perf_counter() - t
            times["positive"] = float(
                sum(1 for f in explained.findings.series.values() if f.positive)
            )
            read = self.ledger_row(job, explained, sr, times.get("result_at"))
            shutil.rmtree(final, ignore_errors=True)  # a crashed earlier attempt's output
            fsync_dir(tmp)  # its entries (outbox/, findings.json) before it is renamed
            os.replace(tmp, final)
            fsync_dir(final.parent)
            # Shadow mode: outbox rows only for the destinations that set `shadow: true`
            # (nothing is queued that will never be sent); the results are made and kept.
            destinations = sent_in_mode(self.config.destinations, self.config.node.mode)
            self.queue.complete(
                job, [d.name for d in destinations], n_files, clock(), sr=sr, read=read
            )
            outcome = JobOutcome(job.job_id, "done", n_files, "")
            self.write_previews(results, final, times)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = self._failed(job, exc, clock)
        finally:
            self.leases.let_go(item)
        self.report(item, outcome, clock)
        return outcome

    def write_previews(self, results: Any, final: Path, times: dict[str, float]) -> None:
        """The heatmaps' PNG previews, once the job is done and its SR on its way.

        A convenience for the web console and non-DICOM readers, kept off the path
        to the PACS. Never raises: a preview that cannot be written is logged (the
        DICOM results and the job's state are not touched).
        """
        from ich_node.results.build import write_previews

        if results is None or not results.heatmaps:
            return
        t = time.perf_counter()
        try:
            write_previews(results, final / "outbox")
        except Exception as exc:
            log.warning("job.previews_not_written", error=type(exc).__name__)
        times["previews_s"] = time.perf_counter() - t

    def _failed(self, job: JobRecord, exc: Exception, clock: Callable[[], float]) -> JobOutcome:
        """Record ``exc`` as the job's retry or parking reason (or find the lease lost)."""
        from ich_node.results.build import ResultsError

        if isinstance(exc, LeaseLost):
            return JobOutcome(job.job_id, "lost", 0, str(exc))
        # An encoding error, or a series refused for its content, comes back on
        # every attempt: parked at once, with its reason.
        permanent = isinstance(exc, ResultsError | SeriesRefused | OutsideStorage)
        if isinstance(exc, OutsideStorage):  # a planted link or a tampered job id
            self.store.refuse_path(exc, "results folder")
        # One line (decoders list their plugins' errors on several): the refusal record,
        # naming attributes, never header values (ich_node.log.redact).
        reason = redact(
            one_line(
                exc.reason if isinstance(exc, ResultsError) else f"{type(exc).__name__}: {exc}",
                500,
            )
        )
        try:
            state = self.queue.fail(job, reason, clock(), permanent=permanent)
        except LeaseLost:
            state = "lost"
        except Exception as db_exc:  # the lease expires and the job runs again
            log.error("job.fail_not_recorded", job_id=job.job_id, error=type(db_exc).__name__)
            state = "lost"
        return JobOutcome(job.job_id, state, 0, reason)

    def give_back(self, item: LeasedJob, clock: Callable[[], float]) -> JobOutcome:
        """A job that never reached the model, returned to the queue at a stop; never raises."""
        job = item.job
        item.cancel.set()
        if item.error is None:  # its reader is decoding: take the rest, up to END
            item.drain()
        try:
            self.queue.give_back(job, clock())
            outcome = JobOutcome(job.job_id, "queued", 0, "given back at stop, not run")
        except LeaseLost as exc:
            outcome = JobOutcome(job.job_id, "lost", 0, str(exc))
        except Exception as exc:  # the lease expires and the job runs again
            outcome = JobOutcome(job.job_id, "lost", 0, f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self.leases.let_go(item)
        self.report(item, outcome, clock)
        return outcome

    def report(self, item: LeasedJob, outcome: JobOutcome, clock: Callable[[], float]) -> None:
        """Stage times into the store (metrics) and the job's one summary line."""
        job, times = item.job, item.times
        total_s = time.perf_counter() - item.started
        try:  # stage latencies for the metrics (the serving process exports them)
            stages: dict[str, float] = {
                k: times[k] for k in ("read_s", "infer_s", "results_s") if k in times
            }
            if outcome.state == "done":
                stages["job_s"] = total_s
            if stages:
                self.store.add_stage_times(job.job_id, stages, clock())
        except Exception as exc:  # metrics must never fail a job
            log.warning("job.timings_not_recorded", job_id=job.job_id, error=type(exc).__name__)
        # One summary line per job: times of each stage, UIDs and counts only.
        log.info(
            "job.finished",
            job_id=job.job_id,
            series_instance_uid=job.series_instance_uid,
            version=job.version,
            attempt=job.attempts,
            state=outcome.state,
            n_files=outcome.n_files,
            n_slices=int(times.get("n_slices", 0)),
            streamed=int(times["streamed"]) if "streamed" in times else None,
            positive_labels=int(times.get("positive", 0)),
            read_s=round(times.get("read_s", 0.0), 3),
            infer_s=round(times.get("infer_s", 0.0), 3),
            results_s=round(times.get("results_s", 0.0), 3),
            previews_s=round(times["previews_s"], 3) if "previews_s" in times else None,
            alert_s=round(times["alert_s"], 3) if "alert_s" in times else None,
            total_s=round(total_s, 3),
            reason=outcome.reason or None,
            library_warnings=warning_counts(job.job_id) or None,
        )
        PHI.release(item.phi)

    def run(self, finishing: queue.Queue[Any], clock: Callable[[], float]) -> None:
        """The results thread: finish each (item, explained, error) until ``None``."""
        while (entry := finishing.get()) is not None:
            item, explained, error = entry
            try:
                with job_context(item.job.job_id):
                    self.finish(item, explained, error, clock)
            except Exception as exc:  # finish records everything itself; never stop here
                log.error("job.finish_failed", job_id=item.job.job_id, error=type(exc).__name__)

"""``ich-node``: the node's command line.

Commands and flags are a stable interface (admins' scripts call them)::

    ich-node check-config PATH [--role all|listener|worker]
    ich-node predict --bundle B --out DIR [--device D] [--batch-size N] [--heatmaps H]
                     [--negative-top-slices N] [--parametric-map] [--no-dicom] INPUT...
    ich-node serve   --config PATH [--role all|listener|worker]
    ich-node migrate-store --config PATH
    ich-node status  --config PATH [--json]
    ich-node health  --config PATH [--role all|listener|worker] [--json]
    ich-node resend  --config PATH JOB
    ich-node audit   --config PATH --reads READS.csv --out DIR [--since DATE] [--until DATE]
                     [--target-sensitivity 0.95] [--report-zone ZONE]
    ich-node bundle-info BUNDLE
    ich-node web     --config PATH
    ich-node web-user add NAME --role viewer|admin --config PATH [--password-stdin]

Exit codes: 0 success, 1 a run that failed for some inputs, 2 bad usage or
configuration. For ``predict``, a series refused with its reason (one line on
stderr, see docs/imaging.md) is an answer, not a failure; files that are not DICOM,
or inputs where no series could be read at all, give 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ich_node import __version__
from ich_node.config import ConfigError, NodeConfig, load_config
from ich_node.labels import LABELS

if TYPE_CHECKING:
    from ich_node.imaging import CTSeries
    from ich_node.model.inference import Classifier, Prediction
    from ich_node.results.findings import OutputTime, SeriesFindings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _config_or_exit(path: Path) -> NodeConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    """Check what ``serve --role`` will need; 0 when it can start, else one line and 2 (or 1).

    The checks of :mod:`ich_node.service.preflight`, in its order, stopping at the
    first problem (one line naming the key and the file): the keys, callers and
    destinations, ``storage.dir`` writable and its lock free, TLS files, the
    notification targets' files, the model bundle, the store as it is (never
    created or migrated), and for ``all``/``worker`` ``model.device`` and the bundle
    loaded onto it. 1 only for a database that does not answer now. Nothing is
    changed. Warnings (alerts only, low disk, a DEMO bundle) go to stderr.
    """
    from ich_node.service.preflight import check_all

    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    role = args.role
    report = check_all(config, role)
    for warning in report.warnings:
        print(f"ich-node: {args.path}: warning: {warning}", file=sys.stderr)
    if report.problem is not None:
        print(f"ich-node: {args.path}: {report.problem.line()}", file=sys.stderr)
        return report.problem.exit_code
    if role == "listener":
        described = "not checked: a listener loads no model"
    else:
        described = f"{config.model.bundle}: verified, loads on model.device {config.model.device}"
    for_role = "" if role == "all" else f" for --role {role}"
    print(
        f"{args.path}: OK{for_role} (node {config.node.ae_title} on "
        f"{config.node.host}:{config.node.port},"
    )
    print(
        f"  {len(config.callers)} caller(s), {len(config.destinations)} destination(s), "
        f"{len(config.notifications)} notification target(s), storage {config.storage.dir},"
    )
    print(f"  model bundle {described})")
    from ich_node.service.ops import mode_line

    print(f"  {mode_line(config)}")
    return EXIT_OK


def _safe_name(uid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", uid) or "series"


def short_uid(uid: str, width: int = 24) -> str:
    """A UID cut to ``width`` characters, keeping its end (where UIDs differ): ``...<end>``."""
    return uid if len(uid) <= width else "..." + uid[-(width - 3) :]


def table_order(series_instance_uid: str) -> str:
    """The sort key of every per-series table (``predict``'s and the demo's truth table).

    The whole SeriesInstanceUID, never its shortened form (:func:`short_uid` keeps the
    end, so two tables sorted by what they print would differ).
    """
    return series_instance_uid


def format_findings_table(rows: Sequence[SeriesFindings]) -> str:
    """A plain-text table: one row per series (:func:`table_order`), the probability of
    each label (* = at or above that label's threshold), and a row of the thresholds.
    """
    header = ["series", "slices", *LABELS]
    lines = [header]
    ordered = sorted(rows, key=lambda f: table_order(f.series_instance_uid))
    if ordered:
        first = ordered[0].series
        lines.append(["threshold", "", *(f"{first[label].threshold:.2f}" for label in LABELS)])
    for findings in ordered:
        cells = [short_uid(findings.series_instance_uid), str(findings.n_slices)]
        for label in LABELS:
            result = findings.series[label]
            cells.append(f"{result.probability:.2f}{'*' if result.positive else ' '}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )


def _reading_lines(series: CTSeries) -> list[str]:
    """What reading a series did (images left out, notes), one line each."""
    lines = []
    for d in series.dropped:
        name = d.path.name if d.path is not None else d.sop_instance_uid
        frame = f" frame {d.frame_number}" if d.frame_number is not None else ""
        lines.append(f"left out {name}{frame}: {d.reason}")
    lines.extend(f"note: {n.text}" for n in series.notes)
    incomplete = series.coverage_incomplete
    if incomplete is not None:
        lines.append(f"note: coverage incomplete: {incomplete}")
    return lines


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify every CT series found under the inputs; write findings (and DICOM results)."""
    from tqdm import tqdm

    from ich_node.imaging import UNREADABLE, ImagingError, group_series, read_series
    from ich_node.log import configure_logging, handling_phi, warning_counts
    from ich_node.model.bundle import BundleError, load_bundle
    from ich_node.model.inference import Classifier
    from ich_node.results.common import output_time, source_header
    from ich_node.results.findings import write_findings

    # Library warnings go through the scrubbing, summarising renderer (stderr).
    configure_logging("console", "WARNING")
    try:
        bundle = load_bundle(args.bundle)
        classifier = Classifier(
            bundle, device=args.device, batch_size=args.batch_size, tta=args.tta
        )
    except (BundleError, ValueError) as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        groups = group_series(args.inputs)
    except ImagingError as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    unreadable = groups.pop(UNREADABLE, [])
    for path in unreadable:
        print(f"ich-node: {path}: not a readable DICOM image, left out", file=sys.stderr)
    if not groups:
        print("ich-node: no readable DICOM series found in the inputs", file=sys.stderr)
        return EXIT_FAILED
    if bundle.card.demo:
        print(f"NOTE: {bundle.card.display_name}", file=sys.stderr)
    done: list[SeriesFindings] = []
    failures = len(unreadable)
    progress = tqdm(groups.items(), unit="series", disable=not sys.stderr.isatty())
    from ich_node.results.build import failure_reason

    for uid, paths in progress:
        # The series' patient name, IDs and birth date are scrubbed from every
        # message while it is handled (ich_node.log), library warnings included.
        with handling_phi(_phi_of(paths)):
            try:
                series = read_series(paths)
                prediction = classifier.predict_series(series)
            except ImagingError as exc:
                # A refusal is an answer, not a failure: one line with its reason.
                _say(f"ich-node: series {uid}: refused: {exc.refusal(uid).reason}")
                continue
            except Exception as exc:  # one line, then the next series
                failures += 1
                _say(f"ich-node: series {uid}: failed: {failure_reason(exc)}")
                continue
            for line in _reading_lines(series):
                _say(f"ich-node: series {uid}: {line}")
            out_dir = Path(args.out) / _safe_name(series.series_instance_uid)
            # Dated in the study's zone when it names one, else the system's.
            when = output_time(source_header(series))
            write_findings(
                out_dir / "findings.json", dataclasses.replace(prediction.findings, time=when)
            )
            done.append(prediction.findings)
            if not args.no_dicom:
                try:
                    _predict_dicom(args, classifier, prediction, out_dir, when)
                except Exception as exc:  # one line, then the next series
                    failures += 1
                    _say(
                        f"ich-node: series {uid}: findings.json written; DICOM results failed: "
                        f"{failure_reason(exc)}"
                    )
    for kind, n in sorted(warning_counts(None).items()):
        print(f"ich-node: library warning x{n}: {kind}", file=sys.stderr)
    if done:
        sys.stderr.flush()  # notes and warnings first, then the table in one piece
        print(format_findings_table(done))
        print(f"(* = at or above the label's threshold, the bundle's; {done[0].notice})")
        print(f"Results in {args.out}")
    return EXIT_FAILED if failures or not done else EXIT_OK


def _predict_dicom(
    args: argparse.Namespace,
    classifier: Classifier,
    prediction: Prediction,
    out_dir: Path,
    when: OutputTime | None = None,
) -> None:
    """Explain (model stage), encode and write one series' DICOM results.

    Raises
    ------
    ResultsSkipped
        When the source's UIDs cannot be referenced (reported, not a failure).
    ResultsError, OSError
        When the results could not be made or written.
    """
    from ich_node.model.explain import explain_series
    from ich_node.results.build import ResultOptions, ResultsSkipped, build_results, write_results

    options = ResultOptions(
        heatmaps=args.heatmaps,
        negative_top_slices=args.negative_top_slices,
        parametric_map=args.parametric_map,
    )
    explained = explain_series(
        prediction,
        classifier,
        negative_top_slices=options.negative_top_slices,
        explain_slices=options.needs_explanations,
        heatmaps=options.heatmaps,
    )
    try:
        results = build_results(explained, classifier.card, options, when=when)
    except ResultsSkipped as exc:
        uid = prediction.series.series_instance_uid
        _say(f"ich-node: series {uid}: findings.json written; DICOM results skipped: {exc.reason}")
        return
    write_results(results, out_dir)


def _phi_of(paths: Sequence[Path]) -> dict[str, str]:
    """PHI values of a series, read raw from its first, middle and last file."""
    from ich_node.log import phi_values_of_file

    values: dict[str, str] = {}
    for path in {paths[0], paths[len(paths) // 2], paths[-1]} if paths else ():
        values |= phi_values_of_file(path)
    return values


def _say(message: str) -> None:
    """One line on stderr (beside the progress bar), scrubbed: attributes, never values."""
    from tqdm import tqdm

    from ich_node.log import redact

    tqdm.write(redact(message), file=sys.stderr)


def cmd_bundle_info(args: argparse.Namespace) -> int:
    """Print a bundle's model card after verifying the weights."""
    from ich_node.model.bundle import BundleError, bundle_help, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        print(f"  {bundle_help(exc)}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(json.loads(bundle.card.to_json()), indent=2))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    from ich_node.log import configure_logging
    from ich_node.service.serve import serve

    configure_logging(config.logging.format, config.logging.level)
    return serve(config, role=args.role)


def cmd_status(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    from ich_node.service.ops import status

    return status(config, as_json=args.json)


def cmd_health(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    from ich_node.service.ops import health

    return health(config, role=args.role, as_json=args.json)


def cmd_resend(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    from ich_node.service.ops import resend

    return resend(config, args.job)


def cmd_web(args: argparse.Namespace) -> int:
    from ich_node.web.run import run_web

    return run_web(_config_or_exit(args.config))


def cmd_web_user(args: argparse.Namespace) -> int:
    from ich_node.web.run import web_user_add

    return web_user_add(_config_or_exit(args.config), args.name, args.role, args.password_stdin)


def cmd_audit(args: argparse.Namespace) -> int:
    """Compare the node's results with the radiologists' reads (docs/validation.md)."""
    config = _config_or_exit(args.config)
    from ich_node.audit.report import run_audit

    return run_audit(
        config,
        args.reads,
        args.out,
        since=args.since,
        until=args.until,
        target_sensitivity=args.target_sensitivity,
        report_zone=args.report_zone,
    )


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Copy the embedded SQLite store of ``storage.dir`` into ``storage.database``."""
    config = _config_or_exit(args.config)
    if config.storage.database is None:
        print("ich-node: storage.database is not set: nothing to migrate to", file=sys.stderr)
        return EXIT_USAGE
    from ich_node.queue.layout import StorageLayout
    from ich_node.queue.postgres import NotEmpty, PgStore, copy_from_sqlite
    from ich_node.service.serve import StorageLocked, lock_storage

    try:
        fd = lock_storage(config.storage.dir)  # the SQLite node must be stopped
    except StorageLocked as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = PgStore(config.storage)
        try:
            copied = copy_from_sqlite(StorageLayout(config.storage.dir).db, store)
            store.place_store_id()
        finally:
            store.close()
    except (NotEmpty, FileNotFoundError) as exc:
        print(f"ich-node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        os.close(fd)
    print("copied: " + ", ".join(f"{t} {n}" for t, n in copied.items()))
    print("the SQLite file is kept; start the node with this configuration (docs/deployment.md)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ich-node",
        description="AI DICOM node that flags intracranial hemorrhage on head CT. "
        "Its results are AI results for triage support, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"ich-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a node configuration file")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument(
        "--role",
        choices=("all", "listener", "worker"),
        default="all",
        help="check what serve --role checks: all and worker verify the model bundle and "
        "the notification targets' files; listener neither (listener/worker need "
        "storage.database)",
    )
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("predict", help="classify CT series from files or folders, offline")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle (.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each image with its left-right mirror "
        "(recorded in findings.json model.tta and the SR)",
    )
    p.add_argument(
        "--heatmaps",
        choices=("positive", "all", "none"),
        default="positive",
        help="which slices get a heatmap image (default: positive)",
    )
    p.add_argument(
        "--negative-top-slices",
        type=int,
        default=0,
        metavar="N",
        help="for a negative series, explain its N most suspicious slices (default 0)",
    )
    p.add_argument(
        "--parametric-map",
        action="store_true",
        help="also write a Parametric Map of the Grad-CAM values (parametric_map.dcm)",
    )
    p.add_argument(
        "--no-dicom", action="store_true", help="write findings.json only, no SR or heatmaps"
    )
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="DICOM files or folders")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bundle-info", help="verify a model bundle and print its model card")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.set_defaults(func=cmd_bundle_info)

    p = sub.add_parser("web-user", help="manage the web console's users (web.users_file)")
    users = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = users.add_parser("add", help="add a user, or give one a new role and password")
    p.add_argument("name", metavar="NAME", help="user name ([A-Za-z0-9_.@-], 64 at most)")
    p.add_argument("--role", choices=("viewer", "admin"), required=True)
    p.add_argument("--config", type=Path, required=True, metavar="PATH")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (for scripts)",
    )
    p.set_defaults(func=cmd_web_user)

    p = sub.add_parser(
        "audit",
        help="compare the node's results with the radiologists' reads (a local validation)",
        description="Join READS.csv (one row per study: accession_number or "
        "study_instance_uid, ich 0/1, optional subtype columns with the RSNA names, optional "
        "report_time) to the node's results ledger; write DIR/report.json and "
        "DIR/report.html (and a copy in <storage.dir>/audit/latest/) and print a summary. "
        "See docs/validation.md.",
    )
    p.add_argument("--config", type=Path, required=True, metavar="PATH")
    p.add_argument("--reads", type=Path, required=True, metavar="READS.csv")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--since", metavar="DATE", help="first day (YYYY-MM-DD, UTC) of arrivals")
    p.add_argument("--until", metavar="DATE", help="last day (YYYY-MM-DD, UTC), included")
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        metavar="S",
        help="sensitivity the operating point must reach (default 0.95)",
    )
    p.add_argument(
        "--report-zone",
        metavar="ZONE",
        help="IANA time zone of report_time values without an offset (default: this machine's)",
    )
    p.set_defaults(func=cmd_audit)

    for name, func, text in (
        ("serve", cmd_serve, "run the DICOM node until SIGTERM/SIGINT"),
        ("web", cmd_web, "run the web console (web.address) until SIGTERM/SIGINT"),
        ("status", cmd_status, "counts per state, oldest waiting job, recent failures"),
        (
            "health",
            cmd_health,
            "exit 0 when this node can do its job now (listener, disk, store, workers, "
            "destinations); else 1 naming each failing part",
        ),
        ("resend", cmd_resend, "send a parked job's results again"),
        (
            "migrate-store",
            cmd_migrate_store,
            "copy the SQLite store of storage.dir into storage.database (PostgreSQL)",
        ),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, required=True, metavar="PATH")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "health":
            p.add_argument(
                "--json", action="store_true", help="the parts checked, machine-readable"
            )
            p.add_argument(
                "--role",
                choices=("all", "listener", "worker"),
                default="all",
                help="what this host runs (serve --role): listener checks C-ECHO only, "
                "worker this node id's workers only",
            )
        if name == "serve":
            p.add_argument(
                "--role",
                choices=("all", "listener", "worker"),
                default="all",
                help="all: one host (default); listener: receive, spool, assemble; "
                "worker: infer, encode, send (listener/worker need storage.database)",
            )
        if name == "resend":
            p.add_argument("job", metavar="JOB", help="job id (see `ich-node status`)")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback on the terminal: one line, exit 1
        from ich_node.log import redact

        text = redact(" ".join(f"{type(exc).__name__}: {exc}".split())[:500])
        if args.command == "serve":  # its stderr is the log: one more log line
            import structlog

            structlog.get_logger("ich_node.service.cli").error("serve.failed", error=text)
        else:
            print(f"ich-node {args.command}: unexpected error: {text}", file=sys.stderr)
        return EXIT_FAILED
    return result


if __name__ == "__main__":
    sys.exit(main())

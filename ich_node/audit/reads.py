"""The radiologists' reads: the truth the audit compares the node's answers with.

``READS.csv`` has a header and one row per study::

    accession_number,study_instance_uid,ich,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,report_time
    A20240107-0042,,1,0,0,0,0,1,2024-01-07T14:32:00+01:00
    ,1.2.826.0.1.3680043.8.498.77,0,,,,,,

- ``accession_number`` or ``study_instance_uid`` (at least one of the two columns,
  and a value in one of them on each row): the study. The accession number is
  matched first, the Study Instance UID when the accession is empty or unknown.
- ``ich``: 1 when the radiologist found an intracranial hemorrhage, else 0 (the
  model's ``any`` label). Also accepted: ``true``/``false``, ``yes``/``no``.
- Optional, per subtype, a column named as the RSNA 2019 label (``epidural``,
  ``intraparenchymal``, ``intraventricular``, ``subarachnoid``, ``subdural``):
  0/1, or empty when that subtype was not recorded for the study.
- Optional ``report_time``: when the report was signed, ISO 8601
  (``2024-01-07T14:32:00+01:00``; a time without an offset is read in
  ``report_zone``, by default the zone of the machine running the audit).

A row that cannot be used (no key, an ``ich`` that is not 0/1, a bad time) is
never dropped in silence: it is listed in :attr:`Reads.invalid` with its line
number and why, and a second row for the same study in :attr:`Reads.duplicates`.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

from ich_node.labels import LABELS

#: The columns naming a study.
KEY_COLUMNS: Final = ("accession_number", "study_instance_uid")
#: ``ich`` is the model's ``any``; the subtypes keep their RSNA names.
TRUTH_COLUMNS: Final = {"ich": "any", **{label: label for label in LABELS[1:]}}
_TRUE: Final = {"1", "true", "yes", "y"}
_FALSE: Final = {"0", "false", "no", "n"}


class ReadsError(ValueError):
    """A reads file that cannot be used at all (missing, no header, no key or ``ich`` column)."""


@dataclass(frozen=True, slots=True)
class Truth:
    """One study as the radiologist read it.

    Attributes
    ----------
    line : int
        Line in the CSV (the header is line 1).
    accession_number, study_instance_uid : str
        The study's keys (either may be empty, not both).
    labels : dict of str to bool
        Label (``any`` for ``ich``, the subtypes by name) -> present; only the
        labels the row gives.
    report_time : float or None
        When the report was signed, seconds since the epoch.
    """

    line: int
    accession_number: str
    study_instance_uid: str
    labels: dict[str, bool]
    report_time: float | None = None

    @property
    def key(self) -> str:
        """How the study is named in the report: its accession number, else its UID."""
        return self.accession_number or self.study_instance_uid


@dataclass(frozen=True, slots=True)
class Rejected:
    """A row that was not used, and why."""

    line: int
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reads:
    """The rows of a reads CSV: the usable ones and the others, each with its reason."""

    rows: tuple[Truth, ...]
    labels: tuple[str, ...]  # the labels the file has columns for, in LABELS order
    invalid: tuple[Rejected, ...] = ()
    duplicates: tuple[Rejected, ...] = ()
    n_rows: int = 0  # data rows in the file
    columns: tuple[str, ...] = field(default=())


def _flag(value: str) -> bool | None:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not 0 or 1")


def parse_time(value: str, zone: dt.tzinfo | None) -> float:
    """ISO 8601 date-time -> seconds since the epoch; a naive time is in ``zone``
    (``None``: the local zone of this machine).

    Raises
    ------
    ValueError
        When ``value`` is not an ISO 8601 date-time.
    """
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone) if zone is not None else when.astimezone()
    return when.timestamp()


def read_reads(path: Path, report_zone: str | None = None) -> Reads:
    """Read a reads CSV (see the module's notes).

    Parameters
    ----------
    path
        The CSV file (UTF-8, a BOM allowed; comma-separated, a header row).
    report_zone
        IANA zone of ``report_time`` values without an offset; ``None``: local.

    Raises
    ------
    ReadsError
        When the file cannot be read or lacks a key or the ``ich`` column.
    """
    zone = ZoneInfo(report_zone) if report_zone else None
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            table = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReadsError(f"{path}: cannot read the reads file: {exc}") from None
    if not table:
        raise ReadsError(f"{path}: empty file (a header row is needed)")
    header = [h.strip().lower() for h in table[0]]
    if not any(k in header for k in KEY_COLUMNS):
        raise ReadsError(f"{path}: the header needs accession_number or study_instance_uid")
    if "ich" not in header:
        raise ReadsError(f"{path}: the header needs an ich column (1 = hemorrhage, 0 = none)")
    col = {name: i for i, name in enumerate(header)}
    labels = tuple(label for label in LABELS if _column(label) in col)
    rows: list[Truth] = []
    invalid: list[Rejected] = []
    duplicates: list[Rejected] = []
    seen: dict[tuple[str, str], int] = {}
    n_rows = 0
    for number, raw in enumerate(table[1:], start=2):
        if not any(cell.strip() for cell in raw):
            continue  # a blank line
        n_rows += 1

        def cell(name: str, raw: list[str] = raw) -> str:
            i = col.get(name)
            return raw[i].strip() if i is not None and i < len(raw) else ""

        accession, uid = cell("accession_number"), cell("study_instance_uid")
        key = accession or uid
        if not key:
            invalid.append(Rejected(number, "", "no accession_number and no study_instance_uid"))
            continue
        try:
            truth: dict[str, bool] = {}
            for column, label in TRUTH_COLUMNS.items():
                value = cell(column)
                if column == "ich" and not value:
                    raise ValueError("ich is empty")
                if value:
                    flag = _flag(value)
                    assert flag is not None
                    truth[label] = flag
            report = cell("report_time")
            report_time = parse_time(report, zone) if report else None
        except ValueError as exc:
            invalid.append(Rejected(number, key, str(exc)))
            continue
        ident = ("a", accession) if accession else ("u", uid)
        if ident in seen:
            duplicates.append(Rejected(number, key, f"the same study as line {seen[ident]}"))
            continue
        seen[ident] = number
        rows.append(Truth(number, accession, uid, truth, report_time))
    return Reads(tuple(rows), labels, tuple(invalid), tuple(duplicates), n_rows, tuple(header))


def _column(label: str) -> str:
    return "ich" if label == "any" else label

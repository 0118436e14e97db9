"""The log configuration: library messages scrubbed of PHI, summarised, rendered as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom

from ich_node.log import handling_phi, library_text, phi_values, redact, scrub_peer_text

REPO = Path(__file__).resolve().parents[1]


def test_redact_replaces_registered_values_only() -> None:
    """Charsets, SOP classes, modalities, config values and status texts stay readable;
    the registered values of the dataset being handled go, quoted or not."""
    ds = pydicom.Dataset()
    ds.PatientName = "Smith^John^^Mr"
    ds.PatientBirthDate = "19010203"
    ds.AccessionNumber = "ACC-42"
    text = (
        "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9; 'ascii' codec; "
        "No presentation context for 'Comprehensive 3D SR Storage' has been accepted; "
        "modality 'MR' is not in series.modalities; model.device is 'cuda'; "
        "status 0xB000 'Coercion of data elements'; "
        "Unable to convert '1901-02-03' to 'DA' object for 'PatientBirthDate' (0010,0030); "
        'The string "Smith" is unlikely; order ACC-42 of SMITH JOHN'
    )
    assert redact(text) == text  # nothing registered: nothing replaced
    with handling_phi(phi_values(ds)):
        out = redact(text)
    for gone in ("1901-02-03", "Smith", "SMITH", "JOHN", "ACC-42"):
        assert gone not in out
    for kept in ("'utf-8'", "'ascii'", "'Comprehensive 3D SR Storage'", "'MR'", "'cuda'",
                 "'Coercion of data elements'", "'DA'", "'PatientBirthDate'", "(0010,0030)"):  # fmt: skip
        assert kept in out
    assert "'<PatientBirthDate>'" in out and '"<PatientName>"' in out
    assert "order <AccessionNumber> of <PatientName>" in out


def test_library_messages_lose_quoted_values_but_keep_names() -> None:
    text = (
        "Unable to convert '1901-02-03' to 'DA' object for 'PatientBirthDate' (0010,0030); "
        "The string \"Smith\" is unlikely; b'Doe^J'; uid '1.2.840.10008.5.1.4' in "
        "'/var/lib/ich-node/spool/x.dcm'; No presentation context for 'CT Image Storage' "
        "with 'Implicit VR Little Endian'; 'utf-8' codec; doesn't quote 'LI'"
    )
    out = library_text(text)
    for gone in ("1901-02-03", "Smith", "Doe^J", "'LI'"):
        assert gone not in out
    for kept in ("'DA'", "'PatientBirthDate'", "(0010,0030)", "'1.2.840.10008.5.1.4'",
                 "'/var/lib/ich-node/spool/x.dcm'", "'CT Image Storage'",
                 "'Implicit VR Little Endian'", "'utf-8'", "doesn't"):  # fmt: skip
        assert kept in out


def test_peer_text_is_flattened_scrubbed_and_bounded() -> None:
    ds = pydicom.Dataset()
    ds.PatientName = "Qvist^Anna"
    with handling_phi(phi_values(ds)):
        text = scrub_peer_text("Patient QVIST, ANNA\r\nnot found\x00 " + "x" * 500, limit=60)
    assert text.startswith("Patient <PatientName>, <PatientName> not found x")
    assert len(text) == 60 and text.endswith("\u2026")


def test_registered_values_are_removed_unquoted_and_in_any_case() -> None:
    ds = pydicom.Dataset()
    ds.PatientName = "Li^Wei^^Dr"
    ds.PatientID = "A12345"
    ds.PatientBirthDate = "19370405"
    values = phi_values(ds)
    assert {"Li", "Wei", "A12345", "1937-04-05"} <= set(values)
    with handling_phi(values):
        out = redact("patient li wei, id a12345, born '1937-04-05'; listener and Wei-x")
    # Replaced by the attribute's keyword: a reason names the attribute, never the value.
    assert out == (
        "patient <PatientName>, id <PatientID>, born '<PatientBirthDate>'; "
        "listener and <PatientName>-x"
    )
    assert redact("patient li") == "patient li"  # released with its block


_SCRIPT = """
import logging, warnings
from pydicom import config
from pydicom.valuerep import validate_value
from ich_node.log import configure_logging, job_context, warning_counts
configure_logging("json", "INFO")
for i in range(1000):  # RSNA's ID_ UIDs: pydicom logs *and* warns each one
    validate_value("UI", f"ID_{i:06x}", config.WARN)
with job_context("job-1"):
    for i in range(50):
        warnings.warn(f'The string "Name{i}" is unlikely to represent a name', UserWarning)
print(json.dumps({"process": warning_counts(None), "job": warning_counts("job-1")}))
"""


def test_library_warnings_are_json_scrubbed_and_summarised() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + _SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line JSON
    events = [e["event"] for e in lines]
    # 1000 identical kinds: shown at the 1st, 10th, 100th and 1000th, with the count.
    ui = [e for e in events if "VR UI" in e]
    assert len(ui) == 4, events
    assert ui[-1].endswith("(seen 1000 times)")
    assert all("ID_" not in e for e in events)
    # In a job: shown once; the count goes to the job's summary.
    names = [e for e in lines if "person" in e["event"] or "unlikely" in e["event"]]
    assert len(names) == 1 and names[0]["job_id"] == "job-1"
    assert "Name0" not in done.stderr
    counts = json.loads(done.stdout)
    assert list(counts["process"].values()) == [1000]
    assert list(counts["job"].values()) == [50]


def test_fit_on_rsna_style_uids_summarises_the_warnings(tmp_path: Path) -> None:
    """RSNA's files carry ``ID_...`` UIDs: pydicom warns twice per file. One line, counted."""
    import warnings

    from training.phantom import write_dataset

    data = tmp_path / "data"
    write_dataset(data, 4, seed=3, n_slices=(10, 10), matrix=128)
    files = sorted((data / "images").glob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.SOPInstanceUID = path.stem  # ID_<hex>, as in RSNA 2019
            ds.SeriesInstanceUID = "ID_" + ds.SeriesInstanceUID[-9:]
        ds.save_as(path)
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "fit", "--images", str(data / "images"),
         "--labels", str(data / "stage_2_train.csv"), "--arch", "resnet18",
         "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
         "--device", "cpu", "--no-progress", "--no-amp", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ui_lines = [line for line in done.stderr.splitlines() if "VR UI" in line]
    # Never a line per file (was 2 per file): at most the 1st, 10th... and the summary.
    assert len(ui_lines) <= 4, ui_lines
    assert "ID_" not in done.stderr
    summary = tmp_path / "run" / "library_warnings.json"
    if ui_lines:  # counted in the run's folder when any was seen
        counts = json.loads(summary.read_text())
        assert sum(n for k, n in counts.items() if "VR UI" in k) >= len(files), counts

"""Text and VR hygiene of the results (ich_node/results/common.py).

Every output (SR, heatmaps, parametric map) declares the source's character set
and carries each copied name unchanged; a copied value outside its VR is sent
empty (Type 2) or left out (Type 3), logged by keyword and never by value, and
never stops the results. Inputs are built in code from a phantom; the files in
``../shared/cases`` are used as well when present.
"""

from __future__ import annotations

import copy
import io
import subprocess
import warnings
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement

from ich_node.imaging import read_series
from ich_node.labels import LABELS
from ich_node.model.bundle import Bundle, load_bundle
from ich_node.model.explain import explain_series
from ich_node.model.inference import Classifier
from ich_node.results.build import ResultOptions, build_results, write_results
from ich_node.results.common import (
    EQUIPMENT_KEYWORDS,
    invalid_reason,
    source_header,
    study_attributes,
)
from ich_node.results.findings import ExplainedSeries
from tests.conftest import REPO, dcmtk

CASES = REPO.parent / "shared" / "cases"

#: (SpecificCharacterSet, PatientName, ReferringPhysicianName) per character set;
#: the ISO 2022 and Chinese names follow the examples of PS3.5 Annexes H, I, J, K.
CHARSETS: dict[str, tuple[str | list[str], str, str]] = {
    "ISO_IR 100": ("ISO_IR 100", "Müller^Jürgen", "Ångström^Åsa"),
    "ISO_IR 101": ("ISO_IR 101", "Dvořák^Antonín", "Łukasiewicz^Stanisław"),
    "ISO_IR 126": ("ISO_IR 126", "Παπαδόπουλος^Γιώργος", "Διονύσιος^Α"),
    "ISO_IR 144": ("ISO_IR 144", "Иванов^Иван", "Щукин^Юрий"),
    "ISO_IR 148": ("ISO_IR 148", "Yılmaz^Şükrü", "Öztürk^Ağa"),
    "ISO_IR 192": ("ISO_IR 192", "Wang^XiaoDong=王^小東", "Müller^Jürgen"),
    "ISO 2022 IR 87": (
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "Sato^Hanako=佐藤^花子=さとう^はなこ",
    ),
    "ISO 2022 IR 149": (
        ["", "ISO 2022 IR 149"],
        "Hong^Gildong=洪^吉洞=홍^길동",
        "Kim^Minsu=김^민수",
    ),
    "ISO 2022 IR 58": (["", "ISO 2022 IR 58"], "Zhang^XiaoDong=张^小东", "Li^Hua=李^华"),
    "GB18030": ("GB18030", "Wang^XiaoDong=王^小东", "Chen^Jing=陈^静"),
}


def _classifier(path: Path) -> Classifier:
    bundle = load_bundle(path)
    # any decides at 0: every slice is explained, so every output kind is made.
    thresholds = {label: 1.01 for label in LABELS} | {"any": 0.0}
    card = replace(bundle.card, thresholds=thresholds)
    return Classifier(Bundle(bundle.path, card, bundle.model), device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> Classifier:
    return _classifier(tiny_bundle)


@pytest.fixture(scope="module")
def explained(model: Classifier, tmp_path_factory: pytest.TempPathFactory) -> ExplainedSeries:
    """Two phantom slices through the model stage (Grad-CAM maps made there)."""
    from training.phantom import write_series

    phantom = write_series(tmp_path_factory.mktemp("text"), seed=5, n_slices=2, matrix=96)
    prediction = model.predict_series(read_series(list(phantom.paths)))
    return explain_series(prediction, model)


def _reread(header: pydicom.Dataset) -> pydicom.Dataset:
    """Write ``header`` and read it back, as the node reads a received file (raw values)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the planted invalid values
        pydicom.dcmwrite(buffer, header, implicit_vr=False, little_endian=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True, force=True)


def _with(header: pydicom.Dataset, **raw: bytes | str | list[str]) -> pydicom.Dataset:
    """A copy of ``header`` with each keyword's value planted as given (bytes: as is)."""
    out = copy.deepcopy(header)  # update() would share the fixture's elements
    for keyword, value in raw.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None
        out[tag] = DataElement(tag, dictionary_VR(keyword), value)
    return _reread(out)


def _encode(explained: ExplainedSeries, model: Classifier, out: Path) -> list[pydicom.Dataset]:
    """Encode, write, run dciodvfy on each file (0 errors) and read each back."""
    results = build_results(explained, model.card, ResultOptions(parametric_map=True))
    files = [p for p in write_results(results, out) if p.suffix == ".dcm"]
    # A heatmap per slice, the parametric map, the SR: every kind of output.
    assert len(files) == len(explained.series.slices) + 2
    dciodvfy = dcmtk("dciodvfy")
    back = []
    for path in files:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{path.name}: {errors}"
        back.append(pydicom.dcmread(path))
    return back


@pytest.mark.parametrize("name", list(CHARSETS))
def test_each_character_set_is_declared_and_names_kept(
    name: str, explained: ExplainedSeries, model: Classifier, tmp_path: Path
) -> None:
    charset, patient, referring = CHARSETS[name]
    header = _reread(
        _with_text(explained.header, charset, PatientName=patient, ReferringPhysicianName=referring)
    )
    source_bytes = header.get_item(tag_for_keyword("PatientName")).value
    for ds in _encode(replace(explained, header=header), model, tmp_path):
        raw = ds.get_item(tag_for_keyword("PatientName")).value  # before it is decoded
        assert ds.SpecificCharacterSet == charset, ds.SOPClassUID.name
        assert str(ds.PatientName) == patient
        assert str(ds.ReferringPhysicianName) == referring
        assert ds.PatientID == header.PatientID
        if not name.startswith("ISO 2022"):  # one encoding: the very same bytes
            assert raw.rstrip(b" ") == source_bytes.rstrip(b" ")


def _with_text(header: pydicom.Dataset, charset: str | list[str], **values: str) -> pydicom.Dataset:
    """A copy of ``header`` declaring ``charset``, with the given names encoded in it."""
    out = copy.deepcopy(header)
    out.SpecificCharacterSet = charset
    for keyword, value in values.items():
        if charset == ["", "ISO 2022 IR 58"]:
            # pydicom 3.0 writes IR 58 without its escape sequence; PS3.5 J.3's bytes.
            tag = tag_for_keyword(keyword)
            out[tag] = DataElement(tag, "PN", _ir58(value))
        else:
            setattr(out, keyword, value)
    return out


def _ir58(name: str) -> bytes:
    """A PN in ISO 2022 IR 58 as PS3.5 J.3 writes it: ESC $ ) A before each GB2312 run."""
    groups = []
    for group in name.split("="):
        parts = [
            part.encode("ascii") if part.isascii() else b"\x1b$)A" + part.encode("gb2312")
            for part in group.split("^")
        ]
        groups.append(b"^".join(parts))
    return b"=".join(groups)


def _case_files(kind: str) -> list[Path]:
    folder = CASES / kind
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    return sorted(folder.glob("*/*.dcm"))


def test_shared_charset_cases(model: Classifier, tmp_path: Path) -> None:
    for path in _case_files("charset"):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        prediction = model.predict_series(read_series([path]))
        outputs = _encode(explain_series(prediction, model), model, tmp_path / path.parent.name)
        for ds in outputs:
            assert ds.SpecificCharacterSet == source.SpecificCharacterSet, path.parent.name
            assert str(ds.PatientName) == str(source.PatientName), path.parent.name


#: One planted invalid value per kind: keyword, raw bytes, what the outputs hold.
INVALID: list[tuple[str, bytes, str | None]] = [
    ("PatientSex", b"U ", ""),  # enumerated M, F, O
    ("PatientBirthDate", b"00000000", ""),  # DA with month 0
    ("PatientBirthDate", b"1901-02-03", ""),  # DA with dashes
    ("StudyTime", b"10:30:00", ""),  # TM with colons (ACR-NEMA)
    ("StudyTime", b"256000", ""),  # hour 25
    ("StudyDate", b"2000-01-01", ""),
    ("StudyDate", b"20000230", ""),  # no 30 February
    ("PatientID", b"X" * 65 + b" ", ""),  # LO over 64 characters
    ("AccessionNumber", b"A" * 17 + b" ", ""),  # SH over 16
    ("StudyID", b"1\\2 ", ""),  # two values where one is allowed
    ("PatientName", b"A^B^C^D^E^F", ""),  # six components
    ("PatientName", b"Bad\x07Name", ""),  # control character
    ("ReferringPhysicianName", b"\xff\xfe^x", ""),  # not ISO_IR 192 (declared below)
    ("Manufacturer", b"M" * 70, None),  # Type 3: left out
]


@pytest.mark.parametrize(("keyword", "raw", "expected"), INVALID)
def test_invalid_values_are_dropped_and_logged_by_keyword(
    keyword: str,
    raw: bytes,
    expected: str | None,
    explained: ExplainedSeries,
    model: Classifier,
    tmp_path: Path,
) -> None:
    base = _with_text(explained.header, "ISO_IR 192", PatientName="Keep^Me", PatientSex="F")
    header = _with(base, **{keyword: raw})
    with structlog.testing.capture_logs() as logs:
        outputs = _encode(replace(explained, header=header), model, tmp_path)
    dropped = [e for e in logs if e["event"] == "results.value_dropped"]
    assert [e["keyword"] for e in dropped] == [keyword]  # once, by keyword
    planted = raw.decode("latin-1").strip()
    assert all(planted not in repr(e) for e in logs)  # never the value
    for ds in outputs:
        if expected is not None:  # Type 2: present and empty
            assert keyword in ds and str(ds[keyword].value) == expected, keyword
        else:  # Type 3: left out (Manufacturer is the node's own, the source's is gone)
            equipment = ds.get("ContributingEquipmentSequence", [])
            assert all(planted not in str(item.get(keyword, "")) for item in equipment)
            assert planted not in str(ds.get(keyword, ""))
        if keyword != "PatientName":
            assert str(ds.PatientName) == "Keep^Me"  # the other values stay
        if keyword != "PatientSex":
            assert ds.PatientSex == "F"


def test_type3_equipment_left_out_of_the_sr(explained: ExplainedSeries) -> None:
    header = _with(explained.header, Manufacturer=b"M" * 70, ManufacturerModelName=b"Good")
    study = study_attributes(header, explained.series.study_instance_uid)
    assert "Manufacturer" not in study.exact  # left out, not blank
    assert study.exact.ManufacturerModelName == "Good"
    assert study.dropped == ("Manufacturer",)
    assert set(EQUIPMENT_KEYWORDS) >= {"Manufacturer"}


def test_unknown_character_set_declares_none_and_keeps_ascii(
    explained: ExplainedSeries, model: Classifier, tmp_path: Path
) -> None:
    header = _with(
        explained.header,
        SpecificCharacterSet=b"ISO_IR 999",
        PatientName=b"Plain^Ascii",
        ReferringPhysicianName=b"Caf\xe9^X",
    )
    with structlog.testing.capture_logs() as logs:
        outputs = _encode(replace(explained, header=header), model, tmp_path)
    assert "results.charset_unknown" in [e["event"] for e in logs]
    for ds in outputs:
        assert "SpecificCharacterSet" not in ds
        assert str(ds.PatientName) == "Plain^Ascii"
        assert str(ds.ReferringPhysicianName) == ""


def test_default_repertoire_keeps_ascii_only(explained: ExplainedSeries) -> None:
    for charset in (None, b"ISO_IR 6"):
        values: dict[str, bytes] = {"PatientName": b"Caf\xe9^X", "PatientID": b"ABC123"}
        if charset is not None:
            values["SpecificCharacterSet"] = charset
        header = copy.deepcopy(explained.header)
        if "SpecificCharacterSet" in header:
            del header.SpecificCharacterSet
        study = study_attributes(_with(header, **values), explained.series.study_instance_uid)
        assert study.dropped == ("PatientName",)
        assert study.exact.PatientID == "ABC123"


def test_shared_invalid_value_cases(model: Classifier, tmp_path: Path) -> None:
    for path in _case_files("invalid-values"):
        prediction = model.predict_series(read_series([path]))
        explained = explain_series(prediction, model)
        with structlog.testing.capture_logs() as logs:
            outputs = _encode(explained, model, tmp_path / path.parent.name)
        assert [e["event"] for e in logs].count("results.value_dropped") == 1, path.parent.name
        assert all(str(ds.PatientName) == "TEST^BUGHUNT" for ds in outputs)


@pytest.mark.parametrize(
    ("keyword", "value", "ok"),
    [
        ("AcquisitionDateTime", "20001231235959.5+0100", True),  # DT
        ("AcquisitionDateTime", "2000-12-31T23:59", False),
        ("AcquisitionDateTime", "20001301", False),
        ("FrameOfReferenceUID", "1.2.840.10008.1", True),  # UI
        ("FrameOfReferenceUID", "1.2.03", False),  # leading zero
        ("FrameOfReferenceUID", "ID_0a1b2c", False),
        ("PatientSex", "M", True),
        ("PatientSex", "m", False),
        ("StudyDescription", "X" * 64, True),  # LO
        ("StudyDescription", "X" * 65, False),
        ("StudyTime", "103000.123456", True),
        ("StudyTime", "10", True),  # HH alone is a TM
    ],
)
def test_vr_rules(keyword: str, value: str, ok: bool) -> None:
    assert (invalid_reason(keyword, value, ()) is None) is ok


def test_source_header_of_a_series(explained: ExplainedSeries) -> None:
    header = source_header(explained.series)
    assert header.SOPInstanceUID == explained.series.slices[0].sop_instance_uid
    assert "PixelData" not in header


def test_iso_2022_ir_58_is_written_as_ps3_5_annex_j() -> None:
    """pydicom 3.0 drops IR 58's escape sequence; results.common corrects it (PS3.5 J.3)."""
    import ich_node.results.common  # noqa: F401  (applies the correction)

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 58"]
    ds.PatientName = "Zhang^XiaoDong=张^小东"
    back = _reread(ds)
    expected = b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab"
    assert back.get_item(tag_for_keyword("PatientName")).value.rstrip(b" ") == expected
    assert _ir58("Zhang^XiaoDong=张^小东") == expected
    assert str(back.PatientName) == "Zhang^XiaoDong=张^小东"

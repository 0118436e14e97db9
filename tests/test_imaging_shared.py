"""Irregular real files in ../shared/cases and ../shared/real-ct (issue #13).

Each case is derived from the real GE head CT in ``real-ct/neurolabusc+dcm_qa_ct/In/GE``,
so the right HU are known exactly: those of the GE files. Skipped when ../shared is
absent; the files are never copied into the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ich_node.imaging import UNREADABLE, ImagingError, group_series, load_series_hu, read_series
from tests.conftest import REPO

SHARED = REPO.parent / "shared"
CASES = SHARED / "cases"
GE = "neurolabusc+dcm_qa_ct/In/GE"


@pytest.fixture(scope="module")
def cases() -> Path:
    if not CASES.is_dir():
        pytest.skip(f"shared cases not present at {CASES}")
    return CASES


@pytest.fixture(scope="module")
def ge_hu(real_ct: Path) -> np.ndarray:
    return load_series_hu(read_series(sorted((real_ct / GE).glob("*.dcm"))))


def _read(folder: Path):  # type: ignore[no-untyped-def]
    return read_series(sorted(p for p in folder.iterdir() if p.is_file()))


@pytest.mark.parametrize(
    ("case", "n", "note"),
    [
        ("rsna-12bit-wrap", 3, "pixel_correction"),
        ("no-file-meta", 3, "transfer_syntax"),
        ("legacy-enhanced-ct", 12, "multi_frame"),
        ("two-reconstructions", 6, "stack_skipped"),
    ],
)
def test_cases_read_as_the_ge_series(
    cases: Path, ge_hu: np.ndarray, case: str, n: int, note: str
) -> None:
    series = _read(cases / case)
    assert len(series.slices) == n
    assert note in [x.kind for x in series.notes]
    np.testing.assert_array_equal(load_series_hu(series), ge_hu[:n])
    if case == "two-reconstructions":
        assert len(series.dropped) == 6
        assert all("BONE+" in d.reason for d in series.dropped)
    if case == "legacy-enhanced-ct":
        assert [s.frame_number for s in series.slices] == list(range(1, 13))


def test_missing_rescale_case_is_refused_naming_the_attribute(cases: Path) -> None:
    series = _read(cases / "missing-rescale")
    with pytest.raises(ImagingError, match="RescaleIntercept"):
        load_series_hu(series)


def test_ge_series_is_one_volume_with_full_coverage(real_ct: Path) -> None:
    series = read_series(sorted((real_ct / GE).glob("*.dcm")))
    assert len(series.slices) == 28 and series.dropped == ()
    assert series.coverage is not None and series.coverage.n_gaps == 0
    assert series.coverage_incomplete is None
    assert [n.kind for n in series.notes] == ["thickness_change"]


def test_ge_series_with_a_71mm_hole_says_so(real_ct: Path) -> None:
    files = sorted((real_ct / GE).glob("*.dcm"))
    series = read_series(files[:10] + files[23:])  # 13 of 28 images missing
    cov = series.coverage
    assert cov is not None and cov.n_gaps == 1 and cov.largest_gap_mm > 60
    assert series.coverage_incomplete is not None


def test_predict_over_all_shared_series_reads_or_refuses_each(
    real_ct: Path,
    cases: Path,
    tiny_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ich_node.service.cli import main

    groups = group_series([real_ct, cases])
    assert UNREADABLE not in groups
    out = tmp_path / "out"
    code = main(["predict", "--bundle", str(tiny_bundle), "--out", str(out), "--no-dicom",
                 str(real_ct), str(cases)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    refused = set(re.findall(r"series (\S+): refused: .+", err))
    read = {p.parent.name for p in out.glob("*/findings.json")}
    for uid in groups:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", uid)
        assert (safe in read) != (uid in refused), uid
    # Only the series without a rescale is refused, and its reason is one line naming it.
    assert len(refused) == 1
    (line,) = [x for x in err.splitlines() if ": refused: " in x]
    assert "RescaleIntercept" in line

"""training.data: RSNA labels CSV, header index, patient split, dataset, sampler."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ich_node.imaging import DEFAULT_WINDOWS, load_hu, preprocess_hu
from ich_node.labels import LABELS, RSNA_ORDER
from training.data import (
    Augment,
    BlockShardSampler,
    DataError,
    SliceDataset,
    build_index,
    collate_skip_none,
    read_labels,
    split_by_patient,
)


def _csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("ID,Label\n" + "".join(f"{k},{v}\n" for k, v in rows))
    return path


def _rows(image: str, positives: set[str] = frozenset()) -> list[tuple[str, int]]:
    return [(f"{image}_{name}", int(name in positives)) for name in RSNA_ORDER]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 small phantom studies (6-8 slices, 128 px) with a corrupt and an unreadable image."""
    from training.phantom import write_dataset

    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, 8, seed=5, n_slices=(6, 8), matrix=128)
    images = root / "images"
    donor = sorted(images.glob("ID_*.dcm"))[0]
    # RSNA's known corrupt image, and a file whose pixel data is cut short.
    shutil.copy(donor, images / "ID_6431af929.dcm")
    data = donor.read_bytes()
    (images / "ID_00000trunc.dcm").write_bytes(data[: len(data) - 5000])
    (images / "ID_0000junk00.dcm").write_bytes(b"not a dicom file" * 20)
    with (root / "stage_2_train.csv").open("a") as fh:
        for image in ("ID_6431af929", "ID_00000trunc", "ID_0000junk00", "ID_00nofile00"):
            fh.writelines(f"{k},{v}\n" for k, v in _rows(image))
    return root


def test_read_labels_maps_rsna_order_and_drops_identical_duplicates(tmp_path: Path) -> None:
    rows = _rows("ID_a", {"subdural", "any"}) + _rows("ID_b") + _rows("ID_a", {"subdural", "any"})
    labels = read_labels(_csv(tmp_path / "l.csv", rows))
    assert list(labels) == ["ID_a", "ID_b"]
    expected = [int(name in ("any", "subdural")) for name in LABELS]
    assert labels["ID_a"].tolist() == expected
    assert labels["ID_b"].tolist() == [0] * 6


def test_read_labels_conflicting_duplicate_names_the_id(tmp_path: Path) -> None:
    rows = [*_rows("ID_a"), ("ID_a_epidural", 1)]
    with pytest.raises(DataError, match="ID_a_epidural"):
        read_labels(_csv(tmp_path / "l.csv", rows))


def test_read_labels_missing_row_and_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ID_a has no row for \['subdural'\]"):
        read_labels(_csv(tmp_path / "a.csv", _rows("ID_a")[:4] + _rows("ID_a")[5:]))
    with pytest.raises(DataError, match="label must be 0 or 1"):
        read_labels(_csv(tmp_path / "b.csv", [("ID_a_any", 2)]))
    with pytest.raises(DataError, match="cannot parse"):
        read_labels(_csv(tmp_path / "c.csv", [("ID_a_blood", 1)]))


def test_index_skips_corrupt_missing_and_unreadable(phantoms: Path, tmp_path: Path) -> None:
    index = build_index(phantoms / "images", phantoms / "stage_2_train.csv", cache_dir=tmp_path)
    skipped = dict(index.skipped)
    assert "known corrupt" in skipped["ID_6431af929"]
    assert skipped["ID_00nofile00"] == "no file"
    assert "unreadable" in skipped["ID_0000junk00"]
    ids = {r.image_id for r in index.records}
    assert not ids & set(skipped)
    assert "ID_00000trunc" in ids  # its header is fine; the pixels fail later
    assert all(r.phantom for r in index.records)
    assert len({r.study_uid for r in index.records}) == 8
    # Slices of a series are in order along the normal.
    for series in {r.series_uid for r in index.records}:
        pos = [r.position_mm for r in index.records if r.series_uid == series]
        assert pos == sorted(pos)
    # The cache is reused, and is the same index.
    assert len(list(tmp_path.glob("index-*.json"))) == 1
    again = build_index(phantoms / "images", phantoms / "stage_2_train.csv", cache_dir=tmp_path)
    assert again == index


def test_undecodable_image_is_dropped_from_the_batch(phantoms: Path) -> None:
    index = build_index(phantoms / "images", phantoms / "stage_2_train.csv")
    bad = next(i for i, r in enumerate(index.records) if r.image_id == "ID_00000trunc")
    dataset = SliceDataset(index.records, DEFAULT_WINDOWS, 32)
    assert dataset[bad] is None
    images, labels, idx = collate_skip_none([dataset[bad], dataset[(bad + 1) % len(dataset)]])
    assert images.shape == (1, 3, 32, 32) and labels.shape == (1, 6)
    assert idx.tolist() == [(bad + 1) % len(dataset)]


def test_patient_split_is_disjoint_deterministic_and_excludes(phantoms: Path) -> None:
    index = build_index(phantoms / "images", phantoms / "stage_2_train.csv")
    split = split_by_patient(index, val_fraction=0.25, seed=1)
    assert split == split_by_patient(index, val_fraction=0.25, seed=1)
    train_p = {index.records[i].patient_id for i in split.train}
    val_p = {index.records[i].patient_id for i in split.val}
    assert train_p and val_p and not train_p & val_p
    assert len(val_p) == 2  # 25 % of 8 patients
    assert sorted(split.train + split.val) == list(range(len(index.records)))
    seeds = {split_by_patient(index, val_fraction=0.25, seed=s).val_patients for s in range(8)}
    assert len(seeds) > 1
    study = index.records[split.val[0]].study_uid
    ex = split_by_patient(index, val_fraction=0.25, seed=1, exclude_studies=[study])
    assert all(index.records[i].study_uid != study for i in ex.train + ex.val)
    assert ex.excluded_studies == (study,)


def test_dataset_uses_the_shared_preprocessing(phantoms: Path, tmp_path: Path) -> None:
    index = build_index(phantoms / "images", phantoms / "stage_2_train.csv")
    plain = SliceDataset(index.records, DEFAULT_WINDOWS, 48)
    cached = SliceDataset(index.records, DEFAULT_WINDOWS, 48, cache_dir=tmp_path)
    for i in (0, 5):
        image, labels, idx = plain[i]
        expected = preprocess_hu(load_hu(index.records[i].path)[None], DEFAULT_WINDOWS, 48)[0]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
        np.testing.assert_array_equal(image.numpy(), expected)
        assert labels.tolist() == list(index.records[i].labels) and idx == i
        for _ in range(2):  # first call writes the uint8 cache, second reads it
            np.testing.assert_allclose(cached[i][0].numpy(), expected, atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(cached[i][0].numpy(), cached[i][0].numpy())


def test_augmentation_is_seeded_per_sample_and_epoch(phantoms: Path) -> None:
    index = build_index(phantoms / "images", phantoms / "stage_2_train.csv")
    aug = Augment(hflip=0.5, rotate_deg=10, scale=0.1, translate=0.05,
                  window_center_hu=10, window_width=0.1)  # fmt: skip
    a = SliceDataset(index.records, DEFAULT_WINDOWS, 32, augment=aug, seed=3)
    b = SliceDataset(index.records, DEFAULT_WINDOWS, 32, augment=aug, seed=3)
    np.testing.assert_array_equal(a[2][0].numpy(), b[2][0].numpy())
    a.set_epoch(1)
    assert not np.array_equal(a[2][0].numpy(), b[2][0].numpy())
    assert float(a[2][0].min()) >= 0.0 and float(a[2][0].max()) <= 1.0


def test_block_shard_sampler_matches_accumulation_micro_batches() -> None:
    n, b, world = 40, 4, 2
    single = list(BlockShardSampler(n, batch_size=b, seed=7))
    ranks = [list(BlockShardSampler(n, batch_size=b, rank=r, world_size=world, seed=7))
             for r in range(world)]  # fmt: skip
    assert sorted(single) == list(range(n))
    assert len(ranks[0]) == len(ranks[1]) == n // world
    # Step k on rank r == micro-batch r of step k in one process with accumulation.
    for k in range(n // (b * world)):
        for r in range(world):
            assert (
                ranks[r][k * b : (k + 1) * b]
                == single[(k * world + r) * b : (k * world + r + 1) * b]
            )
    # Uneven sizes still give every rank the same number of samples.
    odd = [len(BlockShardSampler(13, batch_size=4, rank=r, world_size=2)) for r in (0, 1)]
    assert odd[0] == odd[1] == 7
    s = BlockShardSampler(n, batch_size=b, seed=7)
    s.set_epoch(1)
    assert list(s) != single

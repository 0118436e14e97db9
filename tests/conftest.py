"""Shared fixtures: free ports, tiny bundles, phantom series, real scanner files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_ct_dir() -> Path:
    env = os.environ.get("ICH_REAL_CT")
    return Path(env) if env else REPO.parent / "shared" / "real-ct"


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The folder of real head-CT files (``../shared/real-ct``); skips when absent."""
    path = _real_ct_dir()
    if not path.is_dir():
        pytest.skip(f"real CT files not present at {path}")
    return path


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    from benchmarks.common import free_port as probe

    return probe()


def dcmtk(tool: str) -> str:
    """Path of a DCMTK/dicom3tools binary, skipping the test when it is not installed.

    pynetdicom installs apps named like DCMTK's (``storescu``...) into the venv's bin;
    the real DCMTK lives in the system folders, so look there first.
    """
    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(folder) / tool
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(tool)
    if found is None or ".venv" in found:
        pytest.skip(f"{tool} is not installed (apt-get install dcmtk dicom3tools)")
    return found


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised resnet18 bundle at 64x64 input (fast on a CPU)."""
    from benchmarks.common import random_bundle

    return random_bundle(
        tmp_path_factory.mktemp("bundle") / "model.safetensors",
        name="ich-node test model",
        version="0.0.0-test",
        training_data="none: random weights for tests",
    )


@pytest.fixture
def phantom_series(tmp_path: Path) -> Iterator[object]:
    """One small phantom head CT series (16 slices, 256x256) with a subdural hematoma."""
    from training.phantom import write_series

    yield write_series(tmp_path / "series", seed=7, subtypes=("subdural",), n_slices=16, matrix=256)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, trained here with the demo preset on 20 phantom studies.

    About a minute on two idle CPU cores. Tests that need a model that really learned
    (generalisation, where its heatmaps look) share this one training run.
    """
    from training.phantom import write_dataset
    from training.settings import resolve
    from training.train import fit

    root = tmp_path_factory.mktemp("demo_model")
    write_dataset(root / "data", 20, seed=0)
    settings = resolve(
        REPO / "config" / "train_demo.yaml",
        images=root / "data" / "images",
        labels=root / "data" / "stage_2_train.csv",
        out=root / "run",
        progress=False,
    )
    result = fit(settings, say=lambda _m: None)
    assert result.bundle_path is not None
    return Path(result.bundle_path)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """A throwaway PostgreSQL cluster (tests/pg_cluster.py); skips when not installed."""
    from benchmarks.common import free_port as probe
    from tests.pg_cluster import pg_bin, start_cluster

    pytest.importorskip("psycopg")
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    cluster = start_cluster(probe())
    yield cluster
    cluster.stop()


_PG_DATABASES = iter(range(1, 1_000_000))


@pytest.fixture
def pg_url(pg_cluster: object) -> str:
    """A fresh, empty database in the test cluster; its postgresql:// URL."""
    return pg_cluster.create_database(f"t{os.getpid()}_{next(_PG_DATABASES)}")  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend a test runs on: both, the same test."""
    return str(request.param)


@pytest.fixture
def storage_section(backend: str, request: pytest.FixtureRequest) -> Callable[..., object]:
    """``storage_section(storage_dir, **keys)``: a ``StorageSection`` on the test's backend.

    SQLite: the embedded store in ``storage_dir``. PostgreSQL: a fresh database of the
    test cluster for each storage dir, the same one each time that dir is named again
    (as SQLite's store is one file per dir), so one test can hold two separate nodes.
    """
    from ich_node.config import StorageSection

    cluster = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None
    databases: dict[Path, str] = {}

    def section(storage_dir: Path, **keys: object) -> StorageSection:
        url = None
        if backend == "postgresql":
            key = Path(storage_dir).resolve()
            if key not in databases:
                name = f"t{os.getpid()}_{next(_PG_DATABASES)}"
                databases[key] = cluster.create_database(name)  # type: ignore[attr-defined]
            url = databases[key]
        return StorageSection(dir=storage_dir, database=url, **keys)  # type: ignore[arg-type]

    return section


@pytest.fixture
def open_store(
    backend: str, storage_section: Callable[..., object]
) -> Iterator[Callable[[Path], object]]:
    """``open_store(storage_dir)``: the node's store on the test's backend.

    SQLite: the embedded store in ``storage_dir``. PostgreSQL: the database of
    ``storage_section(storage_dir)`` (every call with the same dir reopens the same one).
    """
    from ich_node.queue.backend import open_store as open_backend

    opened: list[object] = []

    def open_(storage_dir: Path) -> object:
        store = open_backend(storage_section(storage_dir))  # type: ignore[arg-type]
        if backend == "postgresql":
            store.place_store_id()  # as serve does at start: the spool is this database's
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()  # type: ignore[attr-defined]

"""The storage layout (one owner of the paths) and what the serving process imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ich_node.ingest.spool import Spool
from ich_node.queue.layout import StorageLayout, is_temp, outbox_files, path_part
from ich_node.queue.store import Store


def test_paths_under_storage_dir(tmp_path: Path) -> None:
    layout = StorageLayout(tmp_path)
    assert layout.db == tmp_path / "node.sqlite3"
    assert Store.open(tmp_path).path == layout.db
    assert Spool(tmp_path, Store.open(tmp_path), 0).root == layout.spool == tmp_path / "spool"
    path = layout.instance_file("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    assert path == tmp_path / "spool" / "1.2" / "1.2.3" / f"1.2.3.4.{'ab' * 8}.dcm"
    temp = layout.results_temp("job1", 4242)
    assert temp.parent == layout.results and is_temp(temp)
    assert StorageLayout.results_temp_owner(temp.name) == 4242
    assert StorageLayout.results_temp_owner("job1") is None
    (layout.outbox("job1") / "heatmaps").mkdir(parents=True)
    for name in ("sr.dcm", "heatmaps/2.dcm", "heatmaps/1.dcm", "heatmaps/1.png"):
        (layout.outbox("job1") / name).write_bytes(b"x")
    assert [p.name for p in outbox_files(tmp_path, "job1")] == ["1.dcm", "2.dcm", "sr.dcm"]


def test_hostile_uids_never_leave_the_spool(tmp_path: Path) -> None:
    layout = StorageLayout(tmp_path)
    for uid in ("../../etc", "/abs", "1..2", "a" * 200):
        part = path_part(uid)
        assert "/" not in part and ".." not in part and len(part) == 64
    path = layout.instance_file("../x", "..", "../../passwd", "0" * 16)
    assert path.resolve().is_relative_to(layout.spool.resolve())


def test_serving_process_does_not_import_the_worker_module() -> None:
    code = (
        "import sys; import ich_node.service.serve, ich_node.delivery.sender, ich_node.ingest.listener; "
        "bad = [m for m in ('ich_node.service.worker', 'torch', 'ich_node.model.inference') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr

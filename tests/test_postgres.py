"""What only the PostgreSQL backend does: migrations, row-locked leases, NOTIFY, one assembler."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ich_node.config import ConfigError, QueueSection, StorageSection, parse_config
from ich_node.queue.jobs import job_id_for
from ich_node.queue.store import InstanceRecord

psycopg = pytest.importorskip("psycopg")

from ich_node.queue import postgres  # noqa: E402
from ich_node.queue.backend import job_queue, open_store  # noqa: E402


def _record(sop: str, series: str) -> InstanceRecord:
    return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "CT", "", "", "")


def _store(tmp_path: Path, url: str) -> postgres.PgStore:
    store = open_store(StorageSection(dir=tmp_path, database=url))
    assert isinstance(store, postgres.PgStore)
    return store


def test_password_never_in_the_yaml_and_read_from_its_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must not hold a password"):
        parse_config({"storage": {"database": "postgresql://ich:secret@db:5432/ich"}})
    with pytest.raises(ConfigError, match="postgresql://"):
        parse_config({"storage": {"database": "mysql://ich@db/ich"}})
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = parse_config(
        {
            "storage": {
                "database": "postgresql://ich@db:5432/ich",
                "database_password_file": str(secret),
            }
        }
    )
    assert postgres.connect_kwargs(config.storage)["password"] == "s3cret"
    assert "password" not in postgres.connect_kwargs(StorageSection(database="postgresql://a@b/c"))


def test_migrations_run_once_when_nodes_start_together(tmp_path: Path, pg_url: str) -> None:
    stores: list[postgres.PgStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(_store(tmp_path, pg_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 4
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM ich_schema_migrations").fetchall()
        assert [r[0] for r in rows] == list(range(1, postgres.SCHEMA_VERSION + 1))
    assert len({s.store_id for s in stores}) == 1
    for s in stores:
        s.close()


def test_schema_newer_than_the_code_is_refused(tmp_path: Path, pg_url: str) -> None:
    _store(tmp_path, pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ich_schema_migrations VALUES (%s, 0)", (postgres.SCHEMA_VERSION + 1,)
        )
    with pytest.raises(postgres.SchemaTooNew, match="upgrade ich-node"):
        _store(tmp_path, pg_url)


def test_concurrent_workers_never_lease_the_same_job(tmp_path: Path, pg_url: str) -> None:
    store = _store(tmp_path, pg_url)
    for i in range(20):
        series = f"1.2.{i}"
        store.add_instance(_record(f"{series}.1", series), Path(f"/{i}.dcm"), 1, 0.0)
        store.queue_series(series, 1, job_id_for, 0.0)
    leased: dict[str, list[str]] = {}
    lock = threading.Lock()

    def work(name: str) -> None:
        own = _store(tmp_path, pg_url)
        queue = job_queue(own, QueueSection(lease_seconds=600))
        while (job := queue.lease(name, now=1.0)) is not None:
            with lock:
                leased.setdefault(job.job_id, []).append(name)
            queue.complete(job, ["pacs"], 1, now=1.0)
        own.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(leased) == 20 and all(len(names) == 1 for names in leased.values())
    assert store.counts("jobs") == {"done": 20}
    assert len(store.deliveries()) == 20
    store.close()


def test_notify_wakes_an_idle_worker(tmp_path: Path, pg_url: str) -> None:
    waiter, producer = _store(tmp_path, pg_url), _store(tmp_path, pg_url)
    assert waiter.wait_for_jobs(0.05) is False  # nothing queued: the wait times out
    woke: list[bool] = []
    ready = threading.Event()

    def wait() -> None:
        # Each thread listens on a connection of its own: LISTEN in the waiting
        # thread before the job is queued, as a worker's loop does from its first wait.
        waiter.wait_for_jobs(0.0)
        ready.set()
        woke.append(waiter.wait_for_jobs(60.0))

    listening = threading.Thread(target=wait)
    listening.start()
    assert ready.wait(30)
    producer.add_instance(_record("1.9.1", "1.9"), Path("/a.dcm"), 1, 0.0)
    producer.queue_series("1.9", 1, job_id_for, 0.0)
    listening.join(60)
    assert woke == [True]
    waiter.close()
    producer.close()


def test_one_assembler_at_a_time(tmp_path: Path, pg_url: str) -> None:
    a, b = _store(tmp_path, pg_url), _store(tmp_path, pg_url)
    with a.assembly_turn() as mine:
        assert mine
        with b.assembly_turn() as theirs:
            assert not theirs
    with b.assembly_turn() as theirs:
        assert theirs
    a.close()
    b.close()


def test_stale_holder_cannot_complete_a_job_taken_over(tmp_path: Path, pg_url: str) -> None:
    store = _store(tmp_path, pg_url)
    queue = job_queue(store, QueueSection(lease_seconds=5))
    store.add_instance(_record("1.7.1", "1.7"), Path("/a.dcm"), 1, 0.0)
    store.queue_series("1.7", 1, job_id_for, 0.0)
    first = queue.lease("a", now=1.0)
    second = queue.lease("b", now=10.0)  # a's lease expired at 6
    assert first is not None and second is not None and first.job_id == second.job_id
    from ich_node.queue.jobs import LeaseLost

    with pytest.raises(LeaseLost):
        queue.complete(first, ["pacs"], 1, now=11.0)
    queue.complete(second, ["pacs"], 1, now=11.0)
    assert [d.job_id for d in store.deliveries()] == [second.job_id]
    store.close()


def test_store_id_marks_the_shared_storage(tmp_path: Path, pg_url: str) -> None:
    store = _store(tmp_path, pg_url)
    assert not store.storage_mounted()
    assert store.place_store_id()
    assert store.storage_mounted()
    other = _store(tmp_path / "elsewhere", pg_url)
    assert not other.storage_mounted()  # a host whose mount is missing
    store.close()
    other.close()


def test_a_due_delivery_goes_to_one_sender_and_returns_when_it_dies(
    tmp_path: Path, pg_url: str
) -> None:
    a, b = _store(tmp_path, pg_url), _store(tmp_path, pg_url)
    queue = job_queue(a, QueueSection())
    a.add_instance(_record("1.6.1", "1.6"), Path("/a.dcm"), 1, 0.0)
    a.queue_series("1.6", 1, job_id_for, 0.0)
    job = queue.lease("w", now=1.0)
    assert job is not None
    queue.complete(job, ["pacs"], 1, now=1.0)
    assert a.claim_delivery(job.job_id, "pacs", 2.0) is True
    assert b.claim_delivery(job.job_id, "pacs", 2.0) is False  # a holds it
    assert b.due_deliveries(3.0) == []
    # a dies without finishing: after the lease the delivery is due again, for b.
    later = 2.0 + postgres.DELIVERY_LEASE_SECONDS + 1
    assert [d.job_id for d in b.due_deliveries(later)] == [job.job_id]
    assert b.claim_delivery(job.job_id, "pacs", later) is True
    b.finish_delivery(job.job_id, "pacs", "done", "", later, later)
    assert a.claim_delivery(job.job_id, "pacs", later + 1000) is False
    a.close()
    b.close()


def test_paths_are_kept_relative_to_the_shared_storage(tmp_path: Path, pg_url: str) -> None:
    host_a = _store(tmp_path / "mnt-a", pg_url)
    spooled = tmp_path / "mnt-a" / "spool" / "1.2" / "1.5" / "1.5.1.abc.dcm"
    host_a.add_instance(_record("1.5.1", "1.5"), spooled, 1, 0.0, digest="d1")
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT path FROM instances").fetchone()
    assert row is not None and row[0] == "spool/1.2/1.5/1.5.1.abc.dcm"
    assert host_a.instance_paths("1.5") == [spooled]
    host_b = _store(tmp_path / "mnt-b", pg_url)  # another host, another mount point
    assert host_b.instance_paths("1.5") == [tmp_path / "mnt-b" / "spool/1.2/1.5/1.5.1.abc.dcm"]
    changed = spooled.with_name("1.5.1.def.dcm")
    result = host_a.add_instance(_record("1.5.1", "1.5"), changed, 1, 1.0, digest="d2")
    assert result.replaced_path == spooled
    host_b.forget_instance(str(tmp_path / "mnt-b" / "spool/1.2/1.5/1.5.1.def.dcm"))
    assert host_a.instance_files() == {}
    host_a.close()
    host_b.close()


def test_database_going_away_refuses_images_and_recovers(
    tmp_path: Path, pg_url: str, pg_cluster: object, phantom_series: object
) -> None:
    """While PostgreSQL is down a C-STORE is answered 0xA700 (the PACS retries) and
    nothing is acknowledged; once it is back the same node records the retry."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from benchmarks.common import free_port
    from ich_node.ingest.listener import start_listener
    from ich_node.ingest.spool import Spool

    port = free_port()
    config = parse_config(
        {
            "node": {"ae_title": "ICH_NODE", "host": "127.0.0.1", "port": port},
            "callers": [{"ae_title": "MODALITY"}],
            "storage": {"dir": str(tmp_path / "node"), "database": pg_url, "min_free_mb": 0},
        }
    )
    store = open_store(config.storage)
    assert store.place_store_id()  # type: ignore[attr-defined]
    server = start_listener(config, Spool(config.storage.dir, store, 0))
    import pydicom

    ds = pydicom.dcmread(phantom_series.paths[0])  # type: ignore[attr-defined]

    def send() -> int:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        return int(status.Status)

    try:
        pg_cluster.kill()  # type: ignore[attr-defined]
        try:
            assert send() == 0xA700
        finally:
            pg_cluster.start()  # type: ignore[attr-defined]
        assert send() == 0x0000
        assert set(store.instance_files().values()) == {str(ds.SOPInstanceUID)}
        # No file of the refused attempt is left unrecorded in the spool.
        spooled = [p for p in (tmp_path / "node" / "spool").rglob("*") if p.is_file()]
        assert [str(p) for p in spooled] == list(store.instance_files())
    finally:
        server.shutdown()
        store.close()


def test_a_node_id_in_use_by_a_live_node_is_refused(tmp_path: Path, pg_url: str) -> None:
    from ich_node.service.serve import node_id_in_use

    store = _store(tmp_path, pg_url)
    beating = threading.Event()

    def beat() -> None:
        import time

        while not beating.is_set():
            store.heartbeat("host-a.worker-0", 4242, time.time())
            beating.wait(0.1)

    import time

    store.heartbeat("host-a.worker-0", 4242, time.time())  # beating before the check
    thread = threading.Thread(target=beat)
    thread.start()
    try:
        names = ["host-a.worker", "host-a.worker-0"]
        assert node_id_in_use(store, names, wait=2.0) == "host-a.worker-0"
        assert node_id_in_use(store, ["host-b.worker", "host-b.worker-0"], wait=0.5) is None
    finally:
        beating.set()
        thread.join(5)
    # A previous run of this node that died a moment ago: recent, but no longer beating.
    assert node_id_in_use(store, names, wait=0.5) is None
    store.close()


def test_a_dead_senders_claim_goes_to_another_once_its_heartbeat_is_stale(
    tmp_path: Path, pg_url: str
) -> None:
    """Host a claims a delivery (an alert, say) and dies mid-send: host b sends it
    once a's heartbeat is stale, not after the whole lease; while a lives, never."""
    from ich_node.queue.interface import HEARTBEAT_STALE_SECONDS

    a, b = _store(tmp_path, pg_url), _store(tmp_path, pg_url)
    queue = job_queue(a, QueueSection())
    for n in (7, 8):
        a.add_instance(_record(f"1.{n}.1", f"1.{n}"), Path(f"/{n}.dcm"), 1, 0.0)
        a.queue_series(f"1.{n}", 1, job_id_for, 0.0)
    jobs = [queue.lease("w", now=1.0), queue.lease("w", now=1.0)]
    for job in jobs:
        assert job is not None
        queue.complete(job, ["pacs"], 1, now=1.0)
    first, second = (j.job_id for j in jobs if j is not None)

    def beat(host: str, at: float) -> None:
        a.heartbeat(f"{host}.all", 1, at)

    beat("a", 2.0)
    beat("b", 2.0)
    assert a.claim_delivery(first, "pacs", 2.0, holder="a.all", lease_seconds=1200.0)
    (row,) = [d for d in a.deliveries(first)]
    assert row.next_at >= 2.0 + 1200.0  # a slow live sender keeps it for its whole attempt
    # a lives, past the default lease: b can neither see nor take it.
    t = 2.0 + postgres.DELIVERY_LEASE_SECONDS + 10.0
    beat("a", t)
    beat("b", t)
    assert [d.job_id for d in b.due_deliveries(t)] == [second]
    assert not b.claim_delivery(first, "pacs", t, holder="b.all")
    # a dies (its heartbeat stops): stale seconds later b sends it.
    dead = t + HEARTBEAT_STALE_SECONDS + 1.0
    beat("b", dead)
    assert sorted(d.job_id for d in b.due_deliveries(dead)) == sorted([first, second])
    assert b.claim_delivery(first, "pacs", dead, holder="b.all")
    assert not a.claim_delivery(first, "pacs", dead, holder="a.all")  # b holds it, alive
    b.finish_delivery(first, "pacs", "done", "", dead, dead)  # the ack ends the claim
    assert first not in {d.job_id for d in b.due_deliveries(dead + 10_000.0)}
    # A node restarting under its id gives back what it held at once.
    beat("b", dead)
    assert b.claim_delivery(second, "pacs", dead, holder="b.all")
    assert b.due_deliveries(dead) == []
    assert b.release_claims("b.all", dead + 1.0) == 1
    assert [d.job_id for d in a.due_deliveries(dead + 1.0)] == [second]
    a.close()
    b.close()


def test_the_sender_leases_a_delivery_for_longer_than_its_attempt_can_take(
    tmp_path: Path,
) -> None:
    from ich_node.delivery.sender import Sender
    from ich_node.queue.interface import DeliveryRecord

    config = parse_config(
        {
            "storage": {"dir": str(tmp_path / "node")},
            "sender": {"timeout_seconds": 30.0},
            "notifications": [
                {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 9,
                 "receiving_application": "RIS", "receiving_facility": "H",
                 "timeout_seconds": 600},
            ],
        }
    )  # fmt: skip
    sender = Sender(
        object(),  # type: ignore[arg-type]  # attempt_seconds reads no store
        config.destinations,
        config.sender,
        config.storage.dir,
        "ICH_NODE",
        targets=config.notifications,
    )

    def record(destination: str, n_files: int) -> DeliveryRecord:
        return DeliveryRecord("j", destination, "pending", 0, 0.0, "", n_files, 0.0, 0.0)

    # An alert's attempt ends at its timeout_seconds in all (the total deadline).
    assert sender.attempt_seconds(record("alert:ris", 0)) == 600.0
    assert sender.attempt_seconds(record("pacs", 41)) == 30.0 * 43
    assert postgres.DELIVERY_LEASE_SECONDS < 2 * 600.0  # hence the lease it passes


def test_connections_keep_tcp_alive_both_ways_and_keep_the_urls_options(
    tmp_path: Path, pg_url: str
) -> None:
    """A host that loses power is found dead by the server within about a minute
    (its session locks released), not after the system's ~2 h default."""
    from urllib.parse import quote

    url = f"{pg_url}?options={quote('-c statement_timeout=12345')}"
    kwargs = postgres.connect_kwargs(StorageSection(dir=tmp_path, database=url))
    with psycopg.connect(url, **kwargs) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval",
                         "tcp_keepalives_count", "statement_timeout")
        }  # fmt: skip
    idle, interval, count = postgres.KEEPALIVE
    assert settings == {
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(interval),
        "tcp_keepalives_count": str(count),
        "statement_timeout": "12345ms",  # the admin's own options are kept
    }


@pytest.mark.timeout(300)
def test_a_worker_waits_out_the_database_going_away_and_carries_on(
    tmp_path: Path,
    pg_url: str,
    pg_cluster: object,
    tiny_bundle: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The failure table's row "the database": a worker whose database is down logs
    ``worker.lease_failed`` and waits (the process does not exit); when it is back
    the same worker takes the job and reads it, once."""
    import shutil
    import time

    from benchmarks.common import queue_series, wait_for
    from ich_node.model.bundle import load_bundle
    from ich_node.model.inference import Classifier
    from ich_node.service.worker import Worker
    from training.phantom import write_series

    config = parse_config(
        {
            "storage": {"dir": str(tmp_path / "node"), "database": pg_url},
            "queue": {"lease_seconds": 60.0, "max_attempts": 3, "retry_base_seconds": 0.2},
            "results": {"heatmaps": "none"},
        }
    )
    store = open_store(config.storage)
    assert store.place_store_id()  # type: ignore[attr-defined]
    series = write_series(tmp_path / "src", seed=9, n_slices=6, matrix=64)
    spooled = tmp_path / "node" / "spool" / "s"
    spooled.mkdir(parents=True)
    paths = [Path(shutil.copy2(p, spooled / p.name)) for p in series.paths]
    job = queue_series(store, paths, time.time() - 5)
    worker = Worker(config, "w0", store, Classifier(load_bundle(tiny_bundle), device="cpu"))
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_seconds": 0.1})
    pg_cluster.kill()  # type: ignore[attr-defined]
    down = True
    try:
        runner.start()
        seen = ""
        deadline = time.monotonic() + 30.0
        while "worker.lease_failed" not in seen and time.monotonic() < deadline:
            time.sleep(0.5)  # a lease waits for the pool's 5 s timeout, then fails
            # structlog prints, or goes through logging once a test configured that.
            seen += capsys.readouterr().out + caplog.text
        assert "worker.lease_failed" in seen
        assert runner.is_alive()
        pg_cluster.start()  # type: ignore[attr-defined]
        down = False
        check = open_store(config.storage)
        wait_for("the job done", lambda: check.job(job.job_id).state == "done", 120, every=0.2)  # type: ignore[union-attr]
        done = check.job(job.job_id)
        assert done is not None and done.attempts == 1
        check.close()
    finally:
        if down:
            pg_cluster.start()  # type: ignore[attr-defined]
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    store.close()

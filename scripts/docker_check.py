"""Check the Docker image as docs/deployment.md ("Install with Docker") says to run it.

    python scripts/docker_check.py                          # build, run, send a study, stop
    python scripts/docker_check.py --no-build --image ich-node
    python scripts/docker_check.py --build-arg BASE_IMAGE=... --build-arg PIP_INDEX_URL=...

Needs a Docker engine, DCMTK (storescu, storescp) and this project's venv. What it
does, each step failing loudly with what it saw:

1. ``docker build`` (unless ``--no-build``) and ``docker inspect``: non-root user
   10001, the spool volume, the HEALTHCHECK running ``ich-node health``, tini as PID 1;
2. a configuration folder as the guide describes (``node.yaml`` and a demo model
   bundle, readable by uid 10001), a named volume, and ``docker run -d ... -p
   PORT:11112 -v VOLUME:/var/lib/ich-node -v FOLDER:/etc/ich-node:ro`` (no
   ``--gpus`` on a host without one);
3. waits for Docker to report the container ``healthy``;
4. sends a phantom head CT with DCMTK ``storescu`` to the published port; a DCMTK
   ``storescp`` on the host stands in for the PACS and must receive the SR and the
   heatmap series (read back: modality, references, the demo-model label);
5. ``docker stop`` must end the container cleanly (exit code 0) within the stop
   timeout; after ``docker start`` the job is still recorded done in the volume
   (``ich-node status``) and nothing is sent twice.

Prints one line per step and exits 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    dcmtk,
    free_port,
    nodelay_env,
    random_bundle,
    wait_for,
)


def docker(*args: str, check: bool = True, timeout: float = 600) -> str:
    out = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {out.stderr.strip()[-800:]}")
    return out.stdout.strip()


def bridge_gateway() -> str:
    """The Docker host's address on the default bridge (what the container sees as its peer)."""
    import ipaddress

    ipam = json.loads(docker("network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"))
    if ipam[0].get("Gateway"):
        return str(ipam[0]["Gateway"])
    # Docker gives the bridge the first address of the subnet when none is configured.
    return str(next(ipaddress.ip_network(ipam[0]["Subnet"]).hosts()))


def container_logs(name: str, lines: int = 30) -> str:
    """The container's last log lines (stdout and stderr)."""
    return subprocess.run(
        ["docker", "logs", "--tail", str(lines), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    ).stdout


def say(step: str, detail: str) -> None:
    print(f"ok  {step:<34} {detail}", flush=True)


def check_image(image: str) -> None:
    config: dict[str, Any] = json.loads(docker("image", "inspect", image))[0]["Config"]
    assert config["User"] == "ich:ich", config["User"]
    assert "/var/lib/ich-node" in (config.get("Volumes") or {}), config.get("Volumes")
    health = config["Healthcheck"]["Test"]
    assert health[:3] == ["CMD", "ich-node", "health"], health
    assert config["Entrypoint"][:2] == ["tini", "--"], config["Entrypoint"]
    assert "11112/tcp" in config["ExposedPorts"], config["ExposedPorts"]
    say("image", f"user {config['User']}, volume /var/lib/ich-node, HEALTHCHECK {health[1:3]}")


def write_config(folder: Path, gateway: str, dest_port: int) -> None:
    """node.yaml and a demo bundle, as the guide's /srv/ich-node."""
    random_bundle(
        folder / "model.safetensors",
        name="ich-node docker check (random weights)",
        version="0.0.0-check",
        input_size=128,
        training_data="none: random weights, to check the container",
    )
    (folder / "node.yaml").write_text(
        f"""node:
  ae_title: ICH_NODE
  host: 0.0.0.0
  port: 11112
  workers: 1
callers:
  - ae_title: MODALITY
    host: {gateway}          # the Docker host, as the container sees it
destinations:
  - name: pacs
    ae_title: PACS
    host: {gateway}
    port: {dest_port}
series:
  stable_seconds: 2.0
model:
  bundle: /etc/ich-node/model.safetensors
  device: auto
storage:
  dir: /var/lib/ich-node
logging:
  format: json
  level: INFO
"""
    )
    # Readable by the container's user (uid 10001), as the guide says.
    for path in (folder / "node.yaml", folder / "model.safetensors"):
        os.chown(path, 0, 10001)
        path.chmod(0o640)
    os.chown(folder, 0, 10001)
    folder.chmod(0o750)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default="ich-node")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--network", default=None, help="docker build --network (e.g. host)")
    args = parser.parse_args(argv)

    if not args.no_build:
        started = time.perf_counter()
        build = ["build", "-t", args.image]
        build += [x for a in args.build_arg for x in ("--build-arg", a)]
        build += ["--network", args.network] if args.network else []
        docker(*build, str(REPO), timeout=3600)
        say("docker build", f"{time.perf_counter() - started:.0f} s")
    check_image(args.image)

    name = f"ich-node-check-{os.getpid()}"
    volume = f"{name}-spool"
    gateway = bridge_gateway()
    with tempfile.TemporaryDirectory(prefix="ich-docker-") as tmp:
        tmp_path = Path(tmp)
        etc = tmp_path / "etc"
        etc.mkdir()
        received = tmp_path / "received"
        received.mkdir()
        dest_port, node_port = free_port(), free_port()
        write_config(etc, gateway, dest_port)
        pacs = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "PACS", "-od", str(received), "+uf", str(dest_port)],
            env=nodelay_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            docker("volume", "create", volume)
            started = time.perf_counter()
            docker(
                "run", "-d", "--name", name, "--stop-timeout", "60",
                "-p", f"127.0.0.1:{node_port}:11112",
                "-v", f"{volume}:/var/lib/ich-node", "-v", f"{etc}:/etc/ich-node:ro",
                args.image,
            )  # fmt: skip
            say("docker run", f"{name}, port {node_port} -> 11112, volume {volume}")

            def health() -> str:
                state = json.loads(docker("inspect", name))[0]["State"]
                if not state["Running"]:
                    raise RuntimeError(f"the container stopped: {state['Status']}")
                return str(state.get("Health", {}).get("Status", ""))

            wait_for("the container to be healthy", lambda: health() == "healthy", 240, every=1.0)
            say("HEALTHCHECK", f"healthy after {time.perf_counter() - started:.0f} s")
            uid = docker("exec", name, "id", "-u")
            assert uid == "10001", uid
            mode = docker("exec", name, "stat", "-c", "%a %U", "/var/lib/ich-node")
            assert mode == "700 ich", mode
            say("user and spool", f"uid {uid}, /var/lib/ich-node {mode}")

            from training.phantom import write_series

            study = write_series(
                tmp_path / "study", seed=5, subtypes=("subdural",), n_slices=12, matrix=256
            )
            sent = subprocess.run(
                [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ICH_NODE", "127.0.0.1",
                 str(node_port), *map(str, study.paths)],
                env=nodelay_env(), capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr[-800:]
            say("storescu -> container", f"{len(study.paths)} slices acknowledged")
            t0 = time.perf_counter()
            n_expected = check_results(received, study, wait=180)
            say("results at the PACS", f"{n_expected} objects in {time.perf_counter() - t0:.1f} s")

            t0 = time.perf_counter()
            docker("stop", name, timeout=120)
            code = json.loads(docker("inspect", name))[0]["State"]["ExitCode"]
            assert code == 0, f"exit code {code} after docker stop"
            say("docker stop", f"exit code 0 in {time.perf_counter() - t0:.1f} s")
            docker("start", name)
            wait_for("the container to be healthy", lambda: health() == "healthy", 240, every=1.0)
            status = json.loads(
                docker("exec", name, "ich-node", "status", "--config", "/etc/ich-node/node.yaml",
                       "--json")
            )  # fmt: skip
            jobs = status["jobs"]
            assert jobs.get("done") == 1 and len(jobs) == 1, jobs
            time.sleep(5)  # a restart must not deliver the results again
            assert sum(1 for f in received.rglob("*") if f.is_file()) == n_expected
            say("restart", f"state kept in the volume (jobs {jobs}), nothing sent twice")
        except BaseException:
            print(container_logs(name), file=sys.stderr)
            raise
        finally:
            docker("rm", "-f", name, check=False)
            docker("volume", "rm", volume, check=False)
            pacs.terminate()
            pacs.wait(10)
    print("docker check passed")
    return 0


def check_results(received: Path, study: Any, wait: float) -> int:
    """The SR and the heatmap series reached the PACS, referencing the study; their count."""
    import pydicom

    def arrived() -> list[Any] | None:
        files = sorted(p for p in received.rglob("*") if p.is_file())
        datasets = [pydicom.dcmread(f) for f in files]
        srs = [d for d in datasets if d.Modality == "SR"]
        scs = [d for d in datasets if d.Modality != "SR"]
        return datasets if srs and scs else None

    datasets = wait_for("the SR and the heatmaps at the PACS", arrived, wait, every=1.0)
    time.sleep(3)  # the rest of the series
    datasets = [pydicom.dcmread(f) for f in sorted(received.rglob("*")) if f.is_file()]
    for ds in datasets:
        assert ds.StudyInstanceUID == study.study_instance_uid
        model = str(ds.ManufacturerModelName)
        assert model.startswith("ich-node docker check"), model
    (sr,) = [d for d in datasets if d.Modality == "SR"]
    assert "demo" in str(sr).lower(), "the SR does not say the model is a demo"
    return len(datasets)


if __name__ == "__main__":
    sys.exit(main())

"""The YAML configuration: defaults, documentation and precise error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from ich_node.config import ConfigError, NodeConfig, load_config, parse_config
from ich_node.service.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "node.yaml"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_keys(annotation, path + "."))
    return keys


def test_shipped_file_holds_exactly_the_defaults() -> None:
    assert load_config(SHIPPED).model_dump(exclude={"storage"}) == NodeConfig().model_dump(
        exclude={"storage"}
    )
    assert load_config(SHIPPED).storage.dir == Path("/var/lib/ich-node")


def test_shipped_file_documents_every_key() -> None:
    text = SHIPPED.read_text()
    for key in _keys(NodeConfig):
        leaf = key.split(".")[-1]
        assert f"{leaf}:" in text, f"config/node.yaml does not document {key}"


def test_admin_facing_keys_exist() -> None:
    keys = set(_keys(NodeConfig))
    for key in (
        "node.ae_title", "node.host", "node.port", "node.max_associations", "callers",
        "destinations", "series.stable_seconds", "model.bundle", "model.device",
        "model.batch_size", "storage.dir", "logging.format", "logging.level",
    ):  # fmt: skip
        assert key in keys


def test_loading_gives_typed_frozen_objects(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "ICH", "port": 11112},
                "callers": [{"ae_title": "PACS", "host": "127.0.0.1"}, {"ae_title": "CT1"}],
                "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
                "model": {"bundle": "models/m.safetensors", "device": "cpu"},
                "storage": {"dir": "spool"},
                "logging": {"level": "debug"},
            }
        )
    )
    config = load_config(path)
    assert config.callers[0].host == "127.0.0.1" and config.callers[1].host is None
    assert config.destinations[0].port == 104
    assert config.model.bundle == tmp_path / "models" / "m.safetensors"
    assert config.storage.dir == tmp_path / "spool"
    assert config.logging.level == "DEBUG"
    with pytest.raises(ValueError):
        config.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"node": {"port": 70000}}, "node.port: Input should be less than or equal to 65535 (got 70000)"),
        ({"node": {"port": "104"}}, "node.port: Input should be a valid integer (got '104')"),
        ({"node": {"prot": 104}}, "node.prot: unknown key (value 104)"),
        ({"nodes": {}}, "nodes: unknown key"),
        ({"model": {"device": "tpu"}}, "model.device: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')"),
        ({"callers": [{"host": "x"}]}, "callers[0].ae_title: required key is missing"),
        ({"callers": [{"ae_title": "A_TITLE_LONGER_THAN_16"}]}, "callers[0].ae_title: Value error, an AE title has at most 16 characters"),
        ({"series": {"stable_seconds": -1}}, "series.stable_seconds: Input should be greater than or equal to 0 (got -1)"),
        ({"series": {"body_part_patterns": ["("]}}, "series.body_part_patterns[0]: Value error, not a valid regular expression"),
        ({"logging": {"format": "xml"}}, "logging.format: Input should be 'json' or 'console' (got 'xml')"),
        ({"model": {"batch_size": 0}}, "model.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ({"destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 1}] * 2}, "destination name 'a' is used more than once"),
        ([1, 2], "the top level must be a mapping"),
        # A list written as one value or as a mapping: what a list entry looks like.
        ({"callers": "CT1"}, "callers: must be a list, one `- ` line per entry, each a mapping of ae_title (required) and host (optional); got 'CT1'"),
        ({"callers": {"ae_title": "CT1"}}, "callers: must be a list, one `- ` line per entry, each a mapping of ae_title"),
        ({"callers": ["CT1"]}, "callers[0]: each entry must be a mapping of ae_title (required) and host (optional); got 'CT1'"),
        ({"destinations": {"name": "pacs"}}, "destinations: must be a list, one `- ` line per entry, each a mapping of name, ae_title, host, port (required for kind: dicom, the default) and tls, sr_sop_class, shadow (optional), or of name, kind: dicomweb, url"),
        ({"series": {"modalities": "CT"}}, "series.modalities: must be a list, one `- ` line per entry, each a single value; got 'CT'"),
        ({"notifications": "ris"}, "notifications: must be a list, one `- ` line per entry, each a mapping of name, kind (hl7, webhook, email) and that kind's keys"),
        ({"node": "ICH"}, "node: must be a section (a mapping of its keys, config/node.yaml); got 'ICH'"),
        # HL7 targets: the receiving names are required, and the message says what they are.
        ({"notifications": [{"kind": "hl7", "name": "ris", "host": "h", "port": 2575}]}, "notifications[0] (kind: hl7).receiving_application: required key is missing (MSH-5: the receiving application, as the RIS names it)"),
        ({"notifications": [{"kind": "hl7", "name": "ris", "host": "h", "port": 2575, "receiving_application": "RIS"}]}, "notifications[0] (kind: hl7).receiving_facility: required key is missing (MSH-6"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key_and_the_value(data: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="node.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("node.yaml:")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path).node == NodeConfig().node


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The shipped file holds the defaults: valid keys, but a node that could not work.
    assert main(["check-config", str(SHIPPED)]) == 2
    assert "callers: no caller may send images" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: 0\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.port" in err and "(got 0)" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("node: [unclosed\n")
    assert main(["check-config", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_check_config_console_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  device: gpu\n")
    run = subprocess.run(
        [sys.executable, "-m", "ich_node.service.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "model.device" in run.stderr and "'gpu'" in run.stderr


@pytest.mark.parametrize(("role", "code"), [("listener", 0), ("worker", 2), ("all", 2), (None, 2)])
def test_check_config_role_checks_what_that_role_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str | None, code: int, pg_url: str
) -> None:
    # A listener host of a multi-host node has no bundle and no alert secrets
    # (systemd runs `check-config --role %i` before `serve --role %i`).
    bundle = tmp_path / "models" / "absent.safetensors"
    path = tmp_path / "node.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "callers": [{"ae_title": "PACS"}],
                "model": {"bundle": str(bundle)},
                "storage": {"dir": str(tmp_path / "shared"), "database": pg_url},
                "notifications": [
                    {
                        "name": "pager",
                        "kind": "webhook",
                        "url": "https://gw.example/h",
                        "secret_file": str(tmp_path / "absent.key"),
                    }
                ],
            }
        )
    )
    flags = [] if role is None else ["--role", role]
    assert main(["check-config", *flags, str(path)]) == code
    out, err = capsys.readouterr()
    if code == 0:
        assert "OK for --role listener" in out and "not checked" in out
        assert "warning: destinations: none; a listener sends nothing" in err
        return
    assert "notifications[0] (pager): secret_file of pager unreadable" in err
    (tmp_path / "absent.key").write_text("k3y\n")
    assert main(["check-config", *flags, str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.bundle" in err and str(bundle) in err, err


@pytest.mark.parametrize("role", ["listener", "worker"])
def test_check_config_role_needs_storage_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str
) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"storage": {"dir": str(tmp_path / "s")}}))
    assert main(["check-config", "--role", role, str(path)]) == 2
    err = capsys.readouterr().err
    assert "storage.database" in err and f"--role {role}" in err
    assert main(["check-config", str(path)]) == 2  # one host: the next check, not this one
    assert "storage.database" not in capsys.readouterr().err

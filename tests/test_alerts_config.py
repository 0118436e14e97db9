"""The ``notifications`` and ``results.key_objects`` configuration keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ich_node.config import (
    ConfigError,
    EmailTarget,
    HL7Target,
    WebhookTarget,
    load_config,
    parse_config,
)

HL7 = {
    "name": "ris",
    "kind": "hl7",
    "host": "10.0.0.7",
    "port": 2575,
    "receiving_application": "RIS",
    "receiving_facility": "HOSP",
}
WEBHOOK = {"name": "pager", "kind": "webhook", "url": "https://gw.example/h", "secret_file": "s"}
EMAIL = {"name": "mail", "kind": "email", "host": "smtp", "from": "n@x.org", "to": ["a@x.org"]}


def test_defaults_keep_old_configs_working() -> None:
    config = parse_config({})
    assert config.notifications == ()
    assert config.results.key_objects is False


def test_each_kind_with_its_defaults() -> None:
    hl7, hook, mail = parse_config({"notifications": [HL7, WEBHOOK, EMAIL]}).notifications
    assert isinstance(hl7, HL7Target) and isinstance(hook, WebhookTarget)
    assert isinstance(mail, EmailTarget)
    assert (hl7.when, hl7.labels, hl7.priority_positive) == ("positive", ("any",), "S")
    assert (hl7.sending_application, hl7.sending_facility) == ("ICH_NODE", "ICH_NODE")
    assert hook.include_patient is False and hook.ca_file is None
    assert (mail.starttls, mail.attach_key_image, mail.port) == (True, True, 587)
    assert mail.from_ == "n@x.org" and mail.to == ("a@x.org",)


def test_labels_as_one_word_or_a_list() -> None:
    one = parse_config({"notifications": [{**WEBHOOK, "labels": "subdural"}]})
    many = parse_config({"notifications": [{**WEBHOOK, "labels": ["subdural", "epidural"]}]})
    assert one.notifications[0].labels == ("subdural",)
    assert many.notifications[0].labels == ("subdural", "epidural")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ({**HL7, "kind": "fax"}, "notifications[0]: Input tag 'fax'"),
        ({**HL7, "prio": "S"}, "notifications[0] (kind: hl7).prio: unknown key"),
        ({**HL7, "priority_positive": "X"}, "notifications[0] (kind: hl7).priority_positive"),
        ({**HL7, "port": 0}, "notifications[0] (kind: hl7).port"),
        ({**HL7, "receiving_facility": "A|B"}, "notifications[0] (kind: hl7).receiving_facility"),
        ({**WEBHOOK, "url": "http://gw.example/h"}, "notifications[0] (kind: webhook).url"),
        ({**WEBHOOK, "when": "sometimes"}, "notifications[0] (kind: webhook).when"),
        ({**EMAIL, "labels": ["bleed"]}, "notifications[0] (kind: email).labels[0]"),
        ({**EMAIL, "to": []}, "notifications[0] (kind: email).to"),
        (
            {k: v for k, v in EMAIL.items() if k != "from"},
            "notifications[0] (kind: email).from: required",
        ),
    ],
)
def test_bad_targets_name_the_key_and_the_value(target: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"notifications": [target]}, source="node.yaml")
    assert expected in str(info.value)


def test_target_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="'pager' is used more than once"):
        parse_config({"notifications": [WEBHOOK, {**WEBHOOK, "url": "https://b.example/"}]})


def test_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "notifications:\n"
        "  - {name: pager, kind: webhook, url: 'https://gw.example/', secret_file: s.key,"
        " ca_file: ca.pem}\n"
        "  - {name: mail, kind: email, host: smtp, from: n@x.org, to: a@x.org,"
        " credentials_file: creds}\n"
    )
    hook, mail = load_config(path).notifications
    assert isinstance(hook, WebhookTarget) and isinstance(mail, EmailTarget)
    assert hook.secret_file == tmp_path / "s.key" and hook.ca_file == tmp_path / "ca.pem"
    assert mail.credentials_file == tmp_path / "creds"


def test_check_config_names_unusable_target_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bundle: Path
) -> None:
    from ich_node.service.cli import main

    secret = tmp_path / "s.key"
    creds = tmp_path / "creds"
    badca = tmp_path / "ca.pem"
    badca.write_text("not a certificate\n")
    path = tmp_path / "node.yaml"

    def check(hook: str, mail: str) -> int:
        path.write_text(
            f"callers: [{{ae_title: PACS}}]\nmodel: {{bundle: {tiny_bundle}, device: cpu}}\n"
            "storage: {dir: node, min_free_mb: 0}\n"
            f"notifications:\n  - {{name: pager, kind: webhook, url: 'https://gw.example/', "
            f"secret_file: s.key{hook}}}\n"
            f"  - {{name: mail, kind: email, host: smtp, from: n@x.org, to: a@x.org{mail}}}\n"
        )
        return main(["check-config", str(path)])

    assert check("", "") == 2  # the secret file does not exist
    assert "notifications[0] (pager): secret_file of pager unreadable" in capsys.readouterr().err
    secret.write_text("\n")
    assert check("", "") == 2
    assert "secret_file of pager is empty" in capsys.readouterr().err
    secret.write_text("k3y\n")
    assert check(", ca_file: ca.pem", "") == 2
    assert "notifications[0] (pager): ca_file" in capsys.readouterr().err
    creds.write_text("only-a-user\n")
    assert check("", ", credentials_file: creds") == 2
    assert "notifications[1] (mail): credentials_file of mail needs" in capsys.readouterr().err
    creds.write_text("user\npassword\n")
    assert check("", ", credentials_file: creds") == 0
    assert "2 notification target(s)" in capsys.readouterr().out


def test_email_login_without_starttls_is_refused(tmp_path: Path) -> None:
    # No implicit TLS (SMTPS) in the sender: a login without STARTTLS would go in clear.
    plain = {**EMAIL, "starttls": False, "credentials_file": "creds"}
    with pytest.raises(ConfigError) as info:
        parse_config({"notifications": [HL7, plain]}, source="node.yaml")
    message = str(info.value)
    assert message.startswith("node.yaml:")
    assert "notifications[1] (kind: email)" in message and "'mail'" in message
    assert "starttls: false" in message and "credentials_file" in message
    assert "unencrypted" in message
    # Either key alone stays valid: a relay without login, or a login over STARTTLS.
    relay = parse_config({"notifications": [{**EMAIL, "starttls": False}]}).notifications[0]
    assert isinstance(relay, EmailTarget) and relay.starttls is False
    login = parse_config({"notifications": [{**EMAIL, "credentials_file": "c"}]}).notifications
    assert isinstance(login[0], EmailTarget) and login[0].credentials_file == Path("c")
    path = tmp_path / "node.yaml"
    path.write_text(
        "notifications:\n  - {name: mail, kind: email, host: smtp, from: n@x.org,"
        " to: a@x.org, starttls: false, credentials_file: creds}\n"
    )
    from ich_node.service.cli import main

    assert main(["check-config", str(path)]) == 2

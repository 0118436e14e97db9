"""DICOMweb destinations: the outbox stored by STOW-RS (PS3.18 10.5) with ``dicomweb-client``.

For archives reached over HTTP(S): Orthanc's DICOMweb plugin, dcm4chee-arc, Google
Cloud Healthcare, Azure DICOM. A ``kind: dicomweb`` destination has ``url`` (the
service root), an optional bearer token (``token_file``) or user and password
(``credentials_file``: two lines), and ``ca_file`` to trust besides the system's
CAs. One POST carries the objects not yet accepted; the answer's Referenced SOP
Sequence says which were stored (with a Warning Reason, 0008,1196, recorded), the
Failed SOP Sequence which were not (Failure Reason, 0008,1197).

dicomweb-client sends with ``requests``; its own retries are off (the sender has
its backoff). The attempt's :class:`~ich_node.delivery.deadline.Deadline` holds
its sockets (a ``requests`` adapter hands each new connection to it) and sets
the per-read timeout to what is left. The SR goes in Comprehensive 3D SR, or in
the class ``sr_sop_class`` forces; with ``auto``, an archive that answers "SOP
class not supported" (0x0122) for it gets the next class in the same attempt.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Final

import pydicom
import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
from dicomweb_client.api import DICOMwebClient

from ich_node.config import Destination
from ich_node.delivery.deadline import Deadline
from ich_node.delivery.waits import retry_after
from ich_node.log import scrub_peer_text
from ich_node.queue.layout import OutsideStorage
from ich_node.results.sr import SR_CLASSES

#: Failure Reason (0008,1197) "Referenced SOP Class not supported" (PS3.4 GG.4-1).
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
#: Seconds one read or write of the POST may idle (within the attempt's deadline).
IDLE_SECONDS: Final = 30.0


class StowError(RuntimeError):
    """The archive did not store every object.

    ``permanent`` (HTTP 401/403: the credentials are refused) is parked at once:
    sending again cannot change the answer until an admin fixes the file. Others
    are retried, not before ``retry_after`` seconds when the archive asked for that.
    """

    def __init__(
        self, message: str, *, permanent: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after  # seconds the archive asked to wait (Retry-After)


def _read_token(destination: Destination) -> dict[str, str]:
    headers: dict[str, str] = {}
    if destination.token_file is not None:
        try:
            token = destination.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StowError(
                f"token_file of {destination.name} unreadable: {exc.strerror}"
            ) from None
        if not token:
            raise StowError(f"token_file of {destination.name} is empty")
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _read_credentials(destination: Destination) -> tuple[str, str] | None:
    if destination.credentials_file is None:
        return None
    try:
        lines = destination.credentials_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise StowError(
            f"credentials_file of {destination.name} unreadable: {exc.strerror}"
        ) from None
    if len(lines) < 2 or not lines[0]:
        raise StowError(
            f"credentials_file of {destination.name} needs the user on line 1, "
            "the password on line 2"
        )
    return lines[0], lines[1]


def check_destination(destination: Destination) -> None:
    """Read the files a DICOMweb destination names (start-up check).

    Raises
    ------
    StowError
        Naming the file that cannot be used.
    """
    _read_token(destination)
    _read_credentials(destination)
    if destination.ca_file is not None:
        try:
            ssl.create_default_context().load_verify_locations(cafile=str(destination.ca_file))
        except (OSError, ValueError) as exc:
            raise StowError(f"ca_file {destination.ca_file}: {exc}") from None


class _Adapter(requests.adapters.HTTPAdapter):
    """Hands every new connection's socket to the deadline; reads idle at most what is left."""

    def __init__(self, deadline: Deadline, context: ssl.SSLContext) -> None:
        self.deadline = deadline
        self.context = context
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self.context
        super().init_poolmanager(*args, **kwargs)
        deadline = self.deadline

        class Plain(urllib3.connection.HTTPConnection):
            def _new_conn(self) -> Any:
                deadline.check()
                return deadline.watch(super()._new_conn())

        class Secure(urllib3.connection.HTTPSConnection):
            def _new_conn(self) -> Any:
                deadline.check()
                return deadline.watch(super()._new_conn())

        plain = type("Pool", (urllib3.connectionpool.HTTPConnectionPool,), {"ConnectionCls": Plain})
        secure = type(
            "SecurePool", (urllib3.connectionpool.HTTPSConnectionPool,), {"ConnectionCls": Secure}
        )
        self.poolmanager.pool_classes_by_scheme = {"http": plain, "https": secure}

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["timeout"] = self.deadline.op_timeout(IDLE_SECONDS)
        return super().send(request, **kwargs)


def _session(destination: Destination, deadline: Deadline) -> requests.Session:
    context = ssl.create_default_context()
    if destination.ca_file is not None:
        context.load_verify_locations(cafile=str(destination.ca_file))
    session = requests.Session()
    session.trust_env = False  # no proxies or netrc from the environment
    adapter = _Adapter(deadline, context)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update(_read_token(destination))
    credentials = _read_credentials(destination)
    if credentials is not None:
        session.auth = credentials
    return session


def _answer(response: requests.Response | None) -> pydicom.Dataset | None:
    if response is None or not response.content:
        return None
    try:
        return pydicom.Dataset.from_json(response.content)
    except Exception:
        return None


def _codes(answer: pydicom.Dataset | None, sequence: str, reason: str) -> dict[str, int]:
    """SOP Instance UID -> reason code (0 when none) of one sequence of a STOW-RS answer."""
    found: dict[str, int] = {}
    for item in getattr(answer, sequence, None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        found[uid] = int(item.get(reason, 0) or 0)
    return found


def store_instances(
    files: Sequence[Path],
    destination: Destination,
    *,
    skip: Collection[str] = (),
    on_accepted: Callable[[str], None] | None = None,
    deadline: Deadline,
    alternatives: Path | None = None,
) -> Any:
    """STOW-RS the outbox files not in ``skip`` to ``destination``; a ``SendReport``.

    Raises
    ------
    StowError
        No connection, TLS failure, the deadline, an HTTP error (401/403 name the
        credentials), or objects the archive did not store (their Failure Reason).
    """
    from ich_node.delivery.sender import _SR_NAMES, SendReport, _name

    assert destination.url is not None
    todo: list[tuple[str, pydicom.Dataset, list[pydicom.Dataset]]] = []
    for path in files:
        ds: pydicom.Dataset = pydicom.dcmread(path)
        uid = str(ds.SOPInstanceUID)
        if uid in skip:
            continue
        choices: list[pydicom.Dataset] = [ds]
        sop_class = str(ds.SOPClassUID)
        if sop_class in _SR_NAMES:
            wanted = (
                list(SR_CLASSES)
                if destination.sr_sop_class == "auto"
                else [destination.sr_sop_class]
            )
            choices = []
            for name in wanted:
                if SR_CLASSES[name] == sop_class:
                    choices.append(ds)
                elif alternatives is not None and (alternatives / f"{name}.dcm").is_file():
                    if (alternatives / f"{name}.dcm").is_symlink():
                        raise OutsideStorage(alternatives / f"{name}.dcm", "a symbolic link")
                    choices.append(pydicom.dcmread(alternatives / f"{name}.dcm"))
            if not choices:
                raise StowError(
                    f"the SR of this job exists in no class {destination.name} may take "
                    f"(sr_sop_class: {destination.sr_sop_class})"
                )
        todo.append((uid, choices[0], choices[1:]))
    if not todo:
        return SendReport()
    session = _session(destination, deadline)
    client = DICOMwebClient(destination.url, session=session, timeout=IDLE_SECONDS)
    client.set_http_retry_params(retry=False)
    warnings: list[str] = []
    substituted: list[str] = []
    sent = 0
    try:
        while todo:
            deadline.check()
            answer: pydicom.Dataset | None
            try:
                answer = client.store_instances([ds for _, ds, _ in todo])
            except requests.HTTPError as exc:
                response = exc.response
                answer = _answer(response)
                if answer is None or not getattr(answer, "FailedSOPSequence", None):
                    status = response.status_code if response is not None else 0
                    text = scrub_peer_text(response.text if response is not None else "")
                    hint = " (check token_file / credentials_file)" if status in (401, 403) else ""
                    wait = (
                        retry_after(response.headers.get("Retry-After"))
                        if response is not None and status not in (401, 403)
                        else None
                    )
                    raise StowError(
                        f"{destination.name} answered HTTP {status}{hint}"
                        + (f", Retry-After {wait:g} s" if wait is not None else "")
                        + (f": {text}" if text else ""),
                        permanent=status in (401, 403),
                        retry_after=wait,
                    ) from None
            stored = _codes(answer, "ReferencedSOPSequence", "WarningReason")
            failed = _codes(answer, "FailedSOPSequence", "FailureReason")
            retry: list[tuple[str, pydicom.Dataset, list[pydicom.Dataset]]] = []
            problems = []
            for uid, ds, rest in todo:
                sent_uid = str(ds.SOPInstanceUID)
                if sent_uid in stored:
                    sent += 1
                    if stored[sent_uid]:
                        warnings.append(f"0x{stored[sent_uid]:04X} ({_name(str(ds.SOPClassUID))})")
                    if sent_uid != uid:
                        substituted.append(f"SR sent as {_name(str(ds.SOPClassUID))}")
                    if on_accepted is not None:
                        on_accepted(uid)
                elif failed.get(sent_uid) == SOP_CLASS_NOT_SUPPORTED and rest:
                    retry.append((uid, rest[0], rest[1:]))
                else:
                    code = failed.get(sent_uid)
                    problems.append(
                        f"{_name(str(ds.SOPClassUID))} "
                        + (
                            f"failure reason 0x{code:04X}"
                            if code is not None
                            else "not in the answer"
                        )
                    )
            if problems:
                raise StowError(f"{destination.name} did not store " + "; ".join(problems[:5]))
            todo = retry
    except requests.RequestException as exc:
        if deadline.cut:
            raise StowError(f"STOW-RS to {destination.name}: {deadline.reason()}") from None
        raise StowError(f"STOW-RS to {destination.name}: {type(exc).__name__}") from None
    except OSError as exc:
        if deadline.cut:
            raise StowError(f"STOW-RS to {destination.name}: {deadline.reason()}") from None
        raise StowError(f"STOW-RS to {destination.name}: {type(exc).__name__}: {exc}") from None
    finally:
        session.close()
    return SendReport(sent, tuple(warnings), tuple(substituted))

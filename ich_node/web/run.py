"""``ich-node web`` and ``ich-node web-user add``: start the console, manage its users."""

from __future__ import annotations

import getpass
import secrets
import ssl
import sys
from typing import TextIO

import structlog

from ich_node.config import NodeConfig
from ich_node.web.users import UsersError, add_user, read_users

log = structlog.get_logger("ich_node.web")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def session_secret(config: NodeConfig) -> bytes:
    """The key that signs session cookies: ``web.secret_file``'s bytes, or random ones.

    Raises
    ------
    ValueError
        When the file cannot be read or holds fewer than 32 bytes.
    """
    path = config.web.secret_file
    if path is None:
        return secrets.token_bytes(32)  # sessions end when the console restarts
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"web.secret_file: cannot read {path}: {exc.strerror}") from None
    if len(data) < 32:
        raise ValueError(f"web.secret_file: {path} holds {len(data)} bytes, at least 32 needed")
    return data


def check(config: NodeConfig) -> list[str]:
    """What keeps the console from starting, one line each (key, file and why)."""
    problems: list[str] = []
    web = config.web
    if web.users_file is None:
        problems.append("web.users_file: not set; add a user with `ich-node web-user add`")
    else:
        try:
            if not read_users(web.users_file):
                problems.append(
                    f"web.users_file: {web.users_file} holds no user; add one with "
                    "`ich-node web-user add NAME --role admin --config ...`"
                )
        except UsersError as exc:
            problems.append(f"web.users_file: {exc}")
    try:
        session_secret(config)
    except ValueError as exc:
        problems.append(str(exc))
    if web.tls is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(web.tls.cert), str(web.tls.key)
            )
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"web.tls: cannot load {web.tls.cert} / {web.tls.key}: {exc}")
    return problems


def run_web(config: NodeConfig) -> int:
    """Serve the console at ``web.address`` until SIGTERM/SIGINT; 0, or 2 for a bad config."""
    from ich_node.log import configure_logging

    configure_logging(config.logging.format, config.logging.level)
    problems = check(config)
    for problem in problems:
        log.error("web.bad_config", error=problem)
    if problems:
        return EXIT_CONFIG
    import uvicorn

    from ich_node.web.app import create_app

    host, _, port = config.web.address.rpartition(":")
    app = create_app(config, secret=session_secret(config))
    tls = config.web.tls
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host or "127.0.0.1",
            port=int(port),
            ssl_certfile=None if tls is None else str(tls.cert),
            ssl_keyfile=None if tls is None else str(tls.key),
            log_config=None,  # our logging (structlog JSON, scrubbed) stays in place
            access_log=False,  # its lines hold the query (a search may name a patient)
            server_header=False,
            proxy_headers=False,
            lifespan="off",
        )
    )
    log.info(
        "web.started",
        url=f"{'https' if tls else 'http'}://{host or '127.0.0.1'}:{port}/",
        users_file=str(config.web.users_file),
        show_patient=config.web.show_patient,
    )
    server.run()
    app.state.web.console.close()
    log.info("web.stopped")
    return EXIT_OK if server.started else EXIT_FAILED


def read_password(stdin: bool, stream: TextIO = sys.stdin) -> str:
    """A new password: the first line of ``stream``, or typed twice at the terminal.

    Raises
    ------
    ValueError
        When it is empty or the two typed passwords differ.
    """
    if stdin:
        password = stream.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ")
    if not password:
        raise ValueError("the password is empty")
    return password


def web_user_add(config: NodeConfig, name: str, role: str, password_stdin: bool) -> int:
    """``ich-node web-user add``: 0, or 2 with one line naming what is wrong."""
    path = config.web.users_file
    if path is None:
        print("ich-node: web.users_file is not set in the configuration", file=sys.stderr)
        return EXIT_CONFIG
    try:
        password = read_password(password_stdin)
        new = add_user(path, name, role, password)
    except (ValueError, OSError) as exc:
        print(f"ich-node: web-user add: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{'added' if new else 'updated'} user {name} ({role}) in {path}")
    return EXIT_OK

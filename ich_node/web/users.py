"""The console's users: a file of ``name:role:hash`` lines, and login rate limits.

``web.users_file`` holds one user a line, ``NAME:ROLE:HASH``, where ROLE is
``viewer`` or ``admin`` and HASH an argon2id hash in its PHC string form
(``$argon2id$v=19$m=...,t=...,p=...$salt$hash``) made by argon2-cffi, the
maintained binding of the reference implementation (RFC 9106). Lines starting
with ``#`` and blank lines are ignored. ``ich-node web-user add`` writes it
(owner-only, replaced atomically); the console reads it again whenever it
changes, so a new user, a new password or a removed user counts at the next page.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ich_node.durable import write_atomic

Role = Literal["viewer", "admin"]
ROLES: Final[tuple[Role, ...]] = ("viewer", "admin")
#: A user name: what may stand in a users-file line and a log line.
NAME: Final = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")

_HASHER: Final = PasswordHasher()  # argon2id, the library's current parameters (RFC 9106)
# Verified when the name is unknown, so that an unknown name takes as long as a known one.
_DUMMY_HASH: Final = _HASHER.hash("no such user: timing only")


class UsersError(ValueError):
    """A users file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class User:
    """One console user (``password_hash``: an argon2 PHC string)."""

    name: str
    role: Role
    password_hash: str


def parse_users(text: str, source: str = "<users>") -> dict[str, User]:
    """The users of a users file's ``text``, by name.

    Raises
    ------
    UsersError
        Naming ``source`` and the line number of a malformed line, a bad name or
        role, or a name given twice.
    """
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise UsersError(f"{source}:{number}: expected NAME:ROLE:HASH")
        name, role, password_hash = parts
        if not NAME.match(name):
            raise UsersError(f"{source}:{number}: user name {name!r} is not {NAME.pattern}")
        if role not in ROLES:
            raise UsersError(f"{source}:{number}: role must be viewer or admin, got {role!r}")
        if not password_hash.startswith("$argon2"):
            raise UsersError(f"{source}:{number}: the hash is not an argon2 hash")
        if name in users:
            raise UsersError(f"{source}:{number}: user {name!r} is given twice")
        users[name] = User(name, role, password_hash)
    return users


def read_users(path: Path) -> dict[str, User]:
    """The users in ``path``; ``{}`` when the file does not exist.

    Raises
    ------
    UsersError
        When the file cannot be read or a line is malformed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsersError(f"{path}: cannot read the users file: {exc.strerror}") from None
    return parse_users(text, str(path))


def add_user(path: Path, name: str, role: str, password: str) -> bool:
    """Add user ``name`` to ``path``, or give an existing one this role and password.

    The file is written owner-only (0600) and replaced atomically. Returns ``True``
    when the user is new.

    Raises
    ------
    ValueError
        For a bad name or role, or an empty password.
    UsersError
        When the existing file is malformed.
    """
    if not NAME.match(name):
        raise ValueError(f"name must match [A-Za-z0-9_.@-]{{1,64}}, got {name!r}")
    if role not in ROLES:
        raise ValueError(f"role must be viewer or admin, got {role!r}")
    if not password:
        raise ValueError("the password is empty")
    path = Path(path)
    users = read_users(path)
    new = name not in users
    users[name] = User(name, role, _HASHER.hash(password))
    lines = ["# ich-node web console users: NAME:ROLE:ARGON2-HASH (ich-node web-user add)"]
    lines += [f"{u.name}:{u.role}:{u.password_hash}" for u in users.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    os.chmod(path, 0o600)
    return new


def verify(user: User | None, password: str) -> bool:
    """Whether ``password`` is ``user``'s; ``False`` for ``None`` (after as long a check)."""
    try:
        return _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password) and bool(user)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class UsersFile:
    """``web.users_file``, read again whenever it changes (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}

    def users(self) -> dict[str, User]:
        """The users now; an unreadable or malformed file counts as no user at all.

        Raises
        ------
        UsersError
            When the file is malformed (the caller refuses every login then).
        """
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._users = read_users(self.path) if stamp is not None else {}
                self._stamp = stamp
            return self._users

    def get(self, name: str) -> User | None:
        try:
            return self.users().get(name)
        except UsersError:
            return None


class LoginLimiter:
    """Failed logins counted per user name and per client address over a window.

    After ``max_failures`` failures for one name (``4 * max_failures`` from one
    address: a shared reading-room computer) within ``window_s`` seconds, further
    attempts for it are refused until the oldest failure leaves the window. Keys
    are bounded (the oldest forgotten first), so a flood of names cannot grow it.
    """

    MAX_KEYS: Final = 10000

    def __init__(
        self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _keys(self, name: str, address: str) -> list[tuple[str, int]]:
        return [(f"name:{name}", self.max_failures), (f"addr:{address}", 4 * self.max_failures)]

    def wait_s(self, name: str, address: str) -> float:
        """Seconds until ``name`` may try again from ``address`` (0: now)."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key, limit in self._keys(name, address):
                times = self._failures.get(key)
                if times is None:
                    continue
                while times and now - times[0] >= self.window_s:
                    times.popleft()
                if len(times) >= limit:
                    wait = max(wait, self.window_s - (now - times[0]))
        return wait

    def failed(self, name: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key, _ in self._keys(name, address):
                times = self._failures.pop(key, None) or deque()
                times.append(now)
                self._failures[key] = times
            while len(self._failures) > self.MAX_KEYS:
                self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        """A right password: the name's failures are forgotten (the address's are not)."""
        with self._lock:
            self._failures.pop(f"name:{name}", None)

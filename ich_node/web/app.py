"""The console's pages: a Starlette application with Jinja2 templates.

Plain HTML that works without JavaScript (the Overview refreshes itself with a
``<meta http-equiv="refresh">``), its one stylesheet served from the package,
nothing from the internet. Every page needs a login; sessions are Starlette's
signed cookies (itsdangerous), HttpOnly and SameSite=Strict (and Secure with
``web.tls``), ending ``web.session_minutes`` after the last page and 12 hours
after the login. Every POST carries the session's CSRF token. Only admins may
resend. Each page view and action is one ``web.view`` / ``web.action`` log line
naming the user, the path (never the query: a search may hold a name) and the
status; no header value is ever logged.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import jinja2
import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ich_node import __version__
from ich_node.config import NodeConfig
from ich_node.labels import LABELS
from ich_node.results.findings import NOTICE
from ich_node.web.data import Console, NoStore, SeriesRow, reason
from ich_node.web.plot import probability_svg
from ich_node.web.users import LoginLimiter, User, UsersFile, verify

log = structlog.get_logger("ich_node.web")

HERE: Final = Path(__file__).resolve().parent
#: The longest a session lives, whatever the activity.
MAX_SESSION_S: Final = 12 * 3600
#: The session cookie's name.
COOKIE: Final = "ich_node_session"
_JOB_ID: Final = re.compile(r"^[0-9a-f]{16}$")
_UID: Final = re.compile(r"^[0-9.]{1,64}$")
#: Content-Security-Policy of every page: nothing but this origin, no script at all.
CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-src 'self'; frame-ancestors 'self'; base-uri 'none'"
)
#: The audit report (made by ``ich-node audit``) shown in a sandboxed frame.
REPORT_CSP: Final = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"

Handler = Callable[[Request, User], Awaitable[Response]]


def _time(ts: float | None) -> str:
    if not ts:
        return "—"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _date(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else (da or "—")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(time=_time, date=_date, age=_age, reason=reason, quote=quote)
    env.globals.update(LABELS=LABELS, NOTICE=NOTICE, version=__version__)
    return env


def _safe_next(value: str) -> str:
    """A local path to go to after login (never another site)."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


class Web:
    """The application's state: configuration, console, users, login limits, templates."""

    def __init__(
        self, config: NodeConfig, console: Console, users: UsersFile, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.web = config.web
        self.console = console
        self.users = users
        self.clock = clock
        self.limiter = LoginLimiter(
            self.web.login_max_failures, self.web.login_window_minutes * 60.0, clock
        )
        self.templates = Jinja2Templates(env=_environment())

    # -- sessions --------------------------------------------------------------------
    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str) or len(token) < 32:
            token = secrets.token_urlsafe(32)
            request.session["csrf"] = token
        return token

    def csrf_ok(self, request: Request, form: FormData) -> bool:
        sent, held = form.get("csrf"), request.session.get("csrf")
        return (
            isinstance(sent, str)
            and isinstance(held, str)
            and bool(held)
            and hmac.compare_digest(sent.encode(), held.encode())
        )

    def session_user(self, request: Request) -> tuple[User | None, bool]:
        """The logged-in user, and whether a session just expired."""
        session = request.session
        name = session.get("user")
        if not isinstance(name, str):
            return None, False
        now = self.clock()
        idle = now - float(session.get("seen_at", 0))
        if idle > self.web.session_minutes * 60 or now - float(session.get("login_at", 0)) > (
            MAX_SESSION_S
        ):
            session.clear()
            return None, True
        user = self.users.get(name)
        if user is None:  # removed from the users file since the login
            session.clear()
            return None, False
        session["seen_at"] = now
        return user, False

    def render(
        self,
        request: Request,
        user: User | None,
        name: str,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        flash = request.session.pop("flash", []) if user is not None else []
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "user": user,
                "csrf": self.csrf(request),
                "show_patient": self.web.show_patient and user is not None,
                "mode": self.console.mode,
                "flash": flash,
                "path": request.url.path,
                **context,
            },
            status_code=status_code,
        )

    def message(
        self, request: Request, user: User | None, status: int, title: str, text: str
    ) -> Response:
        return self.render(request, user, "message.html", status, title=title, text=text)

    # -- the wrapper every page goes through -------------------------------------------
    def page(
        self, handler: Handler, *, admin: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            user, expired = self.session_user(request)
            if user is None:
                if expired:
                    log.info("web.session_expired", method=request.method, path=request.url.path)
                    request.session["expired"] = True
                target = request.url.path if request.method == "GET" else "/"
                return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            status = 500
            try:
                if request.method == "POST":
                    form = await request.form()
                    if not self.csrf_ok(request, form):
                        status = 403
                        log.warning(
                            "web.csrf_refused", user=user.name, role=user.role,
                            path=request.url.path,
                        )  # fmt: skip
                        return self.message(
                            request, user, 403, "Refused",
                            "The form's CSRF token is missing or wrong: reload the page and "
                            "try again.",
                        )  # fmt: skip
                    request.state.form = form
                if admin and user.role != "admin":
                    status = 403
                    return self.message(
                        request, user, 403, "Not allowed", "Only admins may do this."
                    )
                response = await handler(request, user)
                status = response.status_code
                return response
            except NoStore as exc:
                status = 503
                title = "No node store yet" if exc.exit_code == 1 else "The store cannot be used"
                return self.message(request, user, 503, title, str(exc))
            except Exception as exc:  # the store is unreachable or a file is odd: a page
                status = 503
                log.error("web.page_failed", path=request.url.path, error=type(exc).__name__)
                return self.message(
                    request, user, 503, "Cannot read the node's state now",
                    f"{type(exc).__name__}; see the console's log. The node itself is not "
                    "affected.",
                )  # fmt: skip
            finally:
                # The audit line: who, what, how it ended. Never the query string.
                log.info(
                    "web.action" if request.method == "POST" else "web.view",
                    user=user.name, role=user.role, method=request.method,
                    path=request.url.path, status=status,
                )  # fmt: skip

        return endpoint


def create_app(
    config: NodeConfig,
    *,
    secret: bytes,
    console: Console | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The console as an ASGI application.

    Parameters
    ----------
    config : NodeConfig
        The node's configuration; ``web.users_file`` must be set.
    secret : bytes
        The key that signs session cookies (at least 32 bytes).

    Raises
    ------
    ValueError
        When ``web.users_file`` is not set or ``secret`` is shorter than 32 bytes.
    """
    if config.web.users_file is None:
        raise ValueError("web.users_file is not set: the console needs its users")
    if len(secret) < 32:
        raise ValueError(f"secret must be at least 32 bytes, got {len(secret)}")
    web = Web(config, console or Console(config), UsersFile(config.web.users_file), clock)
    console = web.console

    # -- login -------------------------------------------------------------------------
    async def login_form(request: Request) -> Response:
        user, _ = web.session_user(request)
        if user is not None:
            return RedirectResponse("/", status_code=303)
        expired = bool(request.session.pop("expired", False))
        return web.render(
            request, None, "login.html", next=_safe_next(request.query_params.get("next", "/")),
            error="Your session expired: log in again." if expired else "",
        )  # fmt: skip

    async def login(request: Request) -> Response:
        form = await request.form()
        address = request.client.host if request.client else "?"
        target = _safe_next(str(form.get("next", "/")))
        if not web.csrf_ok(request, form):
            log.warning("web.csrf_refused", path="/login")
            return web.message(
                request, None, 403, "Refused",
                "The form's CSRF token is missing or wrong: reload the page and try again.",
            )  # fmt: skip
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        user = web.users.get(name)
        wait = web.limiter.wait_s(name, address)
        if wait > 0:
            log.warning("web.login_refused", user=name if user else "(unknown)", peer=address,
                        reason="too many failed logins")  # fmt: skip
            return web.render(
                request, None, "login.html", 429, next=target,
                error=f"Too many failed logins: try again in {wait / 60:.0f} min.",
            )  # fmt: skip
        if not await run_in_threadpool(verify, user, password):
            web.limiter.failed(name, address)
            log.warning("web.login_failed", user=name if user else "(unknown)", peer=address)
            return web.render(
                request, None, "login.html", 401, next=target,
                error="Wrong user name or password.",
            )  # fmt: skip
        assert user is not None
        web.limiter.succeeded(name)
        now = web.clock()
        request.session.clear()  # a fresh session (and CSRF token) at each login
        request.session.update(
            user=user.name, login_at=now, seen_at=now, csrf=secrets.token_urlsafe(32)
        )
        log.info("web.login", user=user.name, role=user.role, peer=address)
        return RedirectResponse(target, status_code=303)

    async def logout(request: Request, user: User) -> Response:
        request.session.clear()
        log.info("web.logout", user=user.name)
        return RedirectResponse("/login", status_code=303)

    # -- pages -------------------------------------------------------------------------
    async def overview(request: Request, user: User) -> Response:
        data = await run_in_threadpool(console.overview, web.clock())
        return web.render(request, user, "overview.html", o=data, config=config)

    def _series_page(q: str, state: str, positive: bool, page: int) -> dict[str, Any]:
        rows = console.series_rows()
        states = sorted({r.state for r in rows})
        if state:
            rows = [r for r in rows if r.state == state]
        if positive:
            rows = [r for r in rows if r.positive_labels]
        if q:
            rows = [r for r in rows if _matches(r, q.lower())]
        size = config.web.page_size
        pages = max(1, -(-len(rows) // size))
        page = min(max(1, page), pages)
        shown = [console.with_header(r) for r in rows[(page - 1) * size : page * size]]
        return {"rows": shown, "n": len(rows), "page": page, "pages": pages, "states": states}

    def _matches(row: SeriesRow, q: str) -> bool:
        s = row.series
        fields = [
            s.series_instance_uid, s.study_instance_uid, s.modality, s.study_description,
            s.series_description, row.state, row.job.job_id if row.job else "",
        ]  # fmt: skip
        fields += row.positive_labels or ()
        if row.read is not None:
            fields.append(row.read.accession_number)
        if any(q in f.lower() for f in fields):
            return True
        if row.read is not None and not config.web.show_patient:
            return False  # the ledger gave the accession: no file to read for this row
        header = console.header(s, row.job)
        if header is None:
            return False
        fields = [header.accession_number, header.study_date]
        if config.web.show_patient:  # what is shown may be searched, nothing else
            fields += [header.patient_name, header.patient_id, header.patient_birth_date]
        return any(q in f.lower() for f in fields)

    async def series_list(request: Request, user: User) -> Response:
        params = request.query_params
        q = params.get("q", "").strip()[:200]
        state = params.get("state", "")
        positive = params.get("positive") == "1"
        try:
            page = int(params.get("page", "1"))
        except ValueError:
            page = 1
        data = await run_in_threadpool(_series_page, q, state, positive, page)
        return web.render(
            request, user, "series_list.html", q=q, state=state, positive=positive, **data
        )

    async def series_version(request: Request, user: User) -> Response:
        uid = request.path_params["uid"]
        version = request.path_params.get("version")
        if not _UID.match(uid):
            return web.message(request, user, 404, "Not found", "No such series.")
        view = await run_in_threadpool(console.version, uid, version)
        if view is None:
            return web.message(request, user, 404, "Not found", "No such series or version.")
        plot = probability_svg(view.findings) if view.findings is not None else ""
        return web.render(request, user, "series.html", v=view, plot=plot)

    async def heatmap(request: Request, user: User) -> Response:
        uid, version = request.path_params["uid"], request.path_params["version"]
        view = await run_in_threadpool(console.version, uid, version) if _UID.match(uid) else None
        path = (
            console.heatmap_path(view.job.job_id, request.path_params["name"])
            if view is not None and view.job is not None
            else None
        )
        if path is None:
            return web.message(request, user, 404, "Not found", "No such heatmap.")
        return FileResponse(path, media_type="image/png")

    async def problems(request: Request, user: User) -> Response:
        data = await run_in_threadpool(console.problems)
        return web.render(request, user, "problems.html", p=data)

    async def resend(request: Request, user: User) -> Response:
        job_id = str(request.state.form.get("job_id", ""))
        back = _safe_next(str(request.state.form.get("back", "/problems")))
        if not _JOB_ID.match(job_id):
            return web.message(request, user, 400, "Bad request", "No such job.")
        done = await run_in_threadpool(console.resend, job_id, web.clock())
        text = f"no job {job_id}" if done is None else done.describe()
        log.info(
            "web.resend", user=user.name, job_id=job_id,
            requeued=bool(done and done.anything),
            deliveries=done.deliveries if done else 0,
        )  # fmt: skip
        request.session["flash"] = [*request.session.get("flash", []), text]
        return RedirectResponse(back, status_code=303)

    async def validation(request: Request, user: User) -> Response:
        report = await run_in_threadpool(console.audit_report)
        return web.render(request, user, "validation.html", report=report)

    async def report_file(request: Request, user: User) -> Response:
        report = console.audit_report()
        name = request.path_params["name"]
        files = {} if report is None else {"report.html": report.html, "report.json": report.json}
        path = files.get(name)
        if path is None:
            return web.message(request, user, 404, "Not found", "No audit report yet.")
        kind = "text/html" if name == "report.html" else "application/json"
        response = FileResponse(path, media_type=kind)
        response.headers["Content-Security-Policy"] = REPORT_CSP
        return response

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", web.page(logout), methods=["POST"]),
        Route("/", web.page(overview), methods=["GET"]),
        Route("/series", web.page(series_list), methods=["GET"]),
        Route("/series/{uid}", web.page(series_version), methods=["GET"]),
        Route("/series/{uid}/v/{version:int}", web.page(series_version), methods=["GET"]),
        Route("/series/{uid}/v/{version:int}/heatmaps/{name}", web.page(heatmap)),
        Route("/problems", web.page(problems), methods=["GET"]),
        Route("/problems/resend", web.page(resend, admin=True), methods=["POST"]),
        Route("/validation", web.page(validation), methods=["GET"]),
        Route("/validation/{name:str}", web.page(report_file), methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "SAMEORIGIN"
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"  # pages may hold patient data
        return response

    from starlette.middleware.base import BaseHTTPMiddleware

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(BaseHTTPMiddleware, dispatch=headers),
            Middleware(
                SessionMiddleware,
                secret_key=secret.hex(),
                session_cookie=COOKIE,
                max_age=MAX_SESSION_S,
                same_site="strict",
                https_only=config.web.tls is not None,
            ),
        ],
    )
    app.state.web = web

    async def not_found(request: Request, exc: Exception) -> Response:
        return HTMLResponse("<!doctype html><title>Not found</title><p>Not found.", 404)

    app.add_exception_handler(404, not_found)
    return app

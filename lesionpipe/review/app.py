"""The review web application (Flask): login, worklist, viewer, decisions, sign-off.

Every route except the login form requires a session; pages redirect to the login form and the
JSON API answers 401. State-changing requests need the session's CSRF token (header
``X-CSRF-Token`` or form field ``csrf_token``). Role and ownership checks are made here on the
server, in :class:`~lesionpipe.review.service.ReviewService`.
"""

from __future__ import annotations

import gzip
import hmac
import logging
import secrets
from pathlib import Path

from flask import Flask, Response, g, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from lesionpipe import __version__
from lesionpipe.review.service import ReviewService
from lesionpipe.review.store import ReviewError, Store
from lesionpipe.review.visitdata import OutputError
from lesionpipe.settings import ReviewSettings

LOG = logging.getLogger("lesionpipe.review")
SESSION_COOKIE = "lp_session"
LOGIN_CSRF_COOKIE = "lp_login_csrf"
#: endpoints reachable without a session
PUBLIC_ENDPOINTS = {"login_form", "login_post"}
#: static files the login page needs (no data, no code)
PUBLIC_STATIC = {"app.css"}
#: failed logins of one user name before it is locked for LOGIN_LOCK_MINUTES
LOGIN_MAX_FAILURES = 5
LOGIN_LOCK_MINUTES = 15
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")


def create_app(output_dir: str | Path, db_path: str | Path, settings: ReviewSettings | None = None,
               *, secure_cookies: bool = False) -> Flask:
    """Build the WSGI app for one pipeline OUTPUT_DIR and one review database."""
    output_dir = Path(output_dir)
    if not (output_dir / "gel_counts.tsv").is_file():
        raise OutputError(f"{output_dir}: no gel_counts.tsv; is this a lesionpipe OUTPUT_DIR?")
    settings = settings or ReviewSettings()
    store = Store(db_path)
    service = ReviewService(store, output_dir, settings)
    here = Path(__file__).parent
    app = Flask("lesionpipe.review", template_folder=str(here / "templates"),
                static_folder=str(here / "static"), static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=1 << 20, JSON_SORT_KEYS=False)
    app.extensions["lesionpipe_review"] = service
    timeout_s = settings.session_timeout_minutes * 60.0

    def is_api() -> bool:
        return request.path.startswith("/api/")

    def fail(message: str, status: int):
        if is_api() or request.method != "GET":
            return jsonify({"error": message}), status
        return render_template("error.html", message=message, status=status), status

    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False

    @app.before_request
    def authenticate():
        g.user = None
        path = request.path
        if ("\x00" in path or "\\" in path or "//" in path
                or any(seg in ("..", ".") for seg in path.split("/"))):
            return jsonify({"error": "invalid path"}), 400
        endpoint = request.endpoint
        if endpoint in PUBLIC_ENDPOINTS:
            return None
        if endpoint == "static" and (request.view_args or {}).get("filename") in PUBLIC_STATIC:
            return None
        found = store.session(request.cookies.get(SESSION_COOKIE, ""), timeout_s=timeout_s)
        if found is None:
            if is_api() or request.method != "GET":
                return jsonify({"error": "not logged in"}), 401
            return redirect(url_for("login_form"))
        g.user, g.csrf = found
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
            if not sent or not hmac.compare_digest(sent, g.csrf):
                return jsonify({"error": "missing or wrong CSRF token"}), 403
        return None

    @app.after_request
    def headers(resp: Response):
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(ReviewError)
    def review_error(exc: ReviewError):
        return fail(str(exc), exc.status)

    @app.errorhandler(OutputError)
    def output_error(exc: OutputError):
        # the message names files (participant and session): log it, never send it to a reader
        ref = secrets.token_hex(4)
        LOG.error("[%s] pipeline outputs cannot be read: %s", ref, exc)
        return fail(f"the pipeline outputs of this visit cannot be read; tell the imaging team "
                    f"(reference {ref})", 500)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return fail(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        ref = secrets.token_hex(4)
        LOG.exception("[%s] unexpected error on %s %s", ref, request.method, request.path)
        return fail(f"internal error (reference {ref})", 500)

    def json_body() -> dict:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ReviewError("expected a JSON object")
        return body

    # --- login ------------------------------------------------------------------------------
    def login_page(error: str = "", status: int = 200):
        # keep an existing token: parallel GETs (favicon...) must not invalidate the open form
        token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not (20 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()):
            token = secrets.token_urlsafe(24)
        resp = Response(render_template("login.html", error=error, csrf=token,
                                        version=__version__), status)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict",
                        secure=secure_cookies)
        return resp

    @app.get("/login")
    def login_form():
        return login_page()

    @app.post("/login")
    def login_post():
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        sent = request.form.get("csrf_token", "")
        if not cookie or not sent or not hmac.compare_digest(cookie, sent):
            return login_page("The login form expired; please try again.", 403)
        username = request.form.get("username", "").strip()[:64]
        if store.recent_login_failures(username, minutes=LOGIN_LOCK_MINUTES) >= LOGIN_MAX_FAILURES:
            store.audit_event(user=None, action="login_refused", target=username,
                              reason="too many failed attempts")
            return login_page(f"Too many failed attempts; try again in {LOGIN_LOCK_MINUTES} "
                              "minutes.", 429)
        user = store.verify_password(username, request.form.get("password", ""))
        if user is None:
            store.audit_event(user=None, action="login_failed", target=username)
            return login_page("Wrong user name or password.", 401)
        token, _ = store.create_session(user)
        resp = redirect(url_for("worklist"))
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict",
                        secure=secure_cookies)
        resp.delete_cookie(LOGIN_CSRF_COOKIE)
        return resp

    @app.post("/logout")
    def logout():
        store.end_session(request.cookies.get(SESSION_COOKIE, ""), g.user)
        resp = redirect(url_for("login_form"))
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    # --- pages -----------------------------------------------------------------------------
    @app.get("/")
    def worklist():
        return render_template("worklist.html", user=g.user, csrf=g.csrf,
                               items=service.worklist(g.user), version=__version__)

    @app.get("/read/<code>")
    def read_page(code: str):
        a = service.assignment_for(g.user, code)
        return render_template("read.html", user=g.user, csrf=g.csrf, code=a["code"],
                               kind=a["kind"], version=__version__)

    # --- API -------------------------------------------------------------------------------
    @app.get("/api/worklist")
    def api_worklist():
        return jsonify({"items": service.worklist(g.user)})

    @app.get("/api/read/<code>/meta")
    def api_meta(code: str):
        return jsonify(service.meta(service.assignment_for(g.user, code)))

    @app.get("/api/read/<code>/state")
    def api_state(code: str):
        return jsonify(service.state(g.user, service.assignment_for(g.user, code)))

    @app.get("/api/read/<code>/volume/<kind>")
    def api_volume(code: str, kind: str):
        a = service.assignment_for(g.user, code)
        data, scale = service.volume(a, kind)
        headers = {"X-Scale": repr(scale), "Content-Type": "application/octet-stream"}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            data = gzip.compress(data, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        return Response(data, headers=headers)

    @app.post("/api/read/<code>/decision")
    def api_decision(code: str):
        a = service.assignment_for(g.user, code)
        return jsonify({"ok": True, **service.decide(g.user, a, json_body())})

    @app.post("/api/read/<code>/grow")
    def api_grow(code: str):
        a = service.assignment_for(g.user, code)
        region = service.grow(a, json_body().get("seed") or [])
        return jsonify({k: region[k] for k in ("n_voxels", "volume_mm3", "display_voxels",
                                               "display_centroid")})

    @app.post("/api/read/<code>/add")
    def api_add(code: str):
        a = service.assignment_for(g.user, code)
        return jsonify({"ok": True, **service.add_lesion(g.user, a, json_body())})

    @app.post("/api/read/<code>/comment")
    def api_comment(code: str):
        a = service.assignment_for(g.user, code)
        return jsonify({"ok": True, **service.comment(g.user, a, json_body())})

    @app.post("/api/read/<code>/sign")
    def api_sign(code: str):
        a = service.assignment_for(g.user, code)
        return jsonify({"ok": True, **service.sign(g.user, a, json_body().get("password", ""))})

    return app

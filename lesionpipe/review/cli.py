"""Entry points of ``lesionpipe review``, ``review-admin`` and ``review-export``.

Heavy imports (Flask, waitress, nibabel) happen inside the functions so that building the
command-line parser stays cheap.
"""

from __future__ import annotations

import getpass
import json
import logging
import secrets
import sys
from pathlib import Path

LOG = logging.getLogger("lesionpipe.review")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class AdminError(Exception):
    """Bad usage of an admin command (exit code 2)."""


def add_review_parsers(sub) -> None:
    """The three subcommands, registered by ``lesionpipe.cli._add_review``."""
    p = sub.add_parser("review", help="serve the central-reader review application",
                       description="Serve the central-reader web application for one pipeline "
                                   "OUTPUT_DIR (loopback only unless --host says otherwise).")
    p.add_argument("output_dir", type=Path, help="the pipeline's OUTPUT_DIR (read only)")
    p.add_argument("--db", type=Path, required=True, help="review database (SQLite; created)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; put a TLS proxy in front of "
                        "anything else)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=8, help="server worker threads (default 8)")
    p.add_argument("--secure-cookies", action="store_true",
                   help="mark cookies Secure (when served over HTTPS through a proxy)")
    p.add_argument("--settings", default=None, metavar="FILE.toml",
                   help="settings TOML; its [review] section is used")

    a = sub.add_parser("review-admin", help="readers, assignments, status, audit verification",
                       description="Manage the review database: users, assignments, status and "
                                   "verification of the audit chain.")
    a.add_argument("--db", type=Path, required=True, help="review database")
    a.add_argument("--settings", default=None, metavar="FILE.toml",
                   help="settings TOML whose [review] section this database uses (recorded on "
                        "first use; a different one later is refused)")
    cmds = a.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    u = cmds.add_parser("add-user", help="create a reader or adjudicator")
    u.add_argument("username")
    u.add_argument("--role", choices=["reader", "adjudicator"], required=True)
    u.add_argument("--name", required=True, help="full name, shown in signatures")
    u.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    pw = cmds.add_parser("set-password", help="set a new password (ends the user's sessions)")
    pw.add_argument("username")
    pw.add_argument("--password-stdin", action="store_true")
    de = cmds.add_parser("deactivate", help="stop a user from logging in")
    de.add_argument("username")
    iv = cmds.add_parser("import-visits", help="register the finished visits of an OUTPUT_DIR")
    iv.add_argument("output_dir", type=Path)
    asg = cmds.add_parser("assign", help="give visits to readers (two per visit) and adjudicators")
    asg.add_argument("output_dir", type=Path)
    asg.add_argument("--readers", nargs="+", required=True, metavar="USER",
                     help="with two readers both read every visit; with more, each visit gets "
                          "two of them, balanced at random (review.readers_per_visit)")
    asg.add_argument("--adjudicators", nargs="*", default=[], metavar="USER",
                     help="adjudicators, spread over the visits")
    asg.add_argument("--visits", nargs="*", default=None, metavar="sub-X/ses-Y",
                     help="only these visits (default: every finished visit)")
    cmds.add_parser("users", help="list users")
    st = cmds.add_parser("status", help="visit status table (shows identities: admin only)")
    st.add_argument("output_dir", type=Path)
    cmds.add_parser("verify", help="check the audit hash chain and the append-only tables")

    e = sub.add_parser("review-export", help="write reviewed counts, masks and the audit trail",
                       description="Write gel_counts_reviewed.tsv (accepted by `lesionpipe "
                                   "analyze`), reviewed masks and the audit trail as CSV.")
    e.add_argument("output_dir", type=Path, help="the pipeline's OUTPUT_DIR")
    e.add_argument("--db", type=Path, required=True)
    e.add_argument("--out", type=Path, default=None,
                   help="export folder (default: review_export/ beside the database)")


def _settings_for_db(store, settings):
    """The [review] settings a database was first served with; refuses a silent change."""
    import dataclasses

    from lesionpipe.settings import ReviewSettings

    row = store.one("SELECT value FROM meta WHERE key='review_settings'")
    if settings is None:
        return ReviewSettings(**json.loads(row["value"])) if row else ReviewSettings()
    current = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    if row is None:
        with store.write() as c:
            c.execute("INSERT INTO meta (key, value) VALUES ('review_settings', ?)", (current,))
            store.audit(c, user=None, action="review_settings", new_value=current)
        return settings
    if json.loads(row["value"]) != json.loads(current):
        raise AdminError(f"{store.path} was started with other [review] settings "
                         f"({row['value']}); use the same settings for the whole review")
    return settings


def serve_cli(args, settings) -> int:
    from waitress import serve

    from lesionpipe.review.app import create_app
    from lesionpipe.review.store import Store
    from lesionpipe.review.visitdata import OutputError

    try:
        if args.host not in LOOPBACK:
            LOG.warning("listening on %s: other machines can reach the review app; serve it "
                        "over HTTPS (reverse proxy) and use --secure-cookies", args.host)
        store = Store(args.db)
        # without --settings: the settings recorded in the database (or the defaults, recorded)
        review = _settings_for_db(store, settings.review if args.settings else None)
        review = _settings_for_db(store, review)
        store.close()
        app = create_app(args.output_dir, args.db, review, secure_cookies=args.secure_cookies)
    except (OutputError, AdminError) as exc:
        print(f"lesionpipe review: error: {exc}", file=sys.stderr)
        return 2
    print(f"lesionpipe review: serving {args.output_dir} on http://{args.host}:{args.port}/",
          flush=True)
    try:
        serve(app, host=args.host, port=args.port, threads=args.threads,
              ident="lesionpipe-review", channel_timeout=120)
    except OSError as exc:
        print(f"lesionpipe review: error: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise AdminError("the two passwords differ")
    return first


def admin_cli(args) -> int:
    from lesionpipe.review.store import ReviewError, Store
    from lesionpipe.review.visitdata import OutputError

    from lesionpipe.settings import Settings

    try:
        store = Store(args.db)
        if args.settings:
            _settings_for_db(store, Settings.from_toml(args.settings).review)
        return _admin(args, store)
    except (ReviewError, OutputError, AdminError, ValueError) as exc:
        print(f"lesionpipe review-admin: error: {exc}", file=sys.stderr)
        return 2


def _admin(args, store) -> int:
    from lesionpipe.review.visitdata import reviewable_visits

    cmd = args.admin_command
    if cmd == "add-user":
        uid = store.add_user(args.username, args.name, args.role,
                             _read_password(args.password_stdin))
        print(f"created {args.role} {args.username} (id {uid})")
    elif cmd == "set-password":
        store.set_password(args.username, _read_password(args.password_stdin))
        print(f"password of {args.username} changed")
    elif cmd == "deactivate":
        store.set_active(args.username, False)
        print(f"{args.username} can no longer log in")
    elif cmd == "import-visits":
        visits = reviewable_visits(args.output_dir)
        print(f"{store.add_visits(visits)} new visit(s); {len(visits)} reviewable in "
              f"{args.output_dir}")
    elif cmd == "assign":
        _assign(args, store, reviewable_visits(args.output_dir))
    elif cmd == "users":
        for u in store.query("SELECT * FROM users ORDER BY role, username"):
            print(f"{u['username']:<16} {u['role']:<12} {'active' if u['active'] else 'inactive':<9}"
                  f" {u['display_name']}")
    elif cmd == "status":
        _status(args, store)
    elif cmd == "verify":
        res = store.verify()
        print(res.summary())
        return 0 if res.ok else 1
    return 0


def _assign(args, store, reviewable) -> None:
    wanted = reviewable
    if args.visits:
        sel = {tuple(v.strip("/").split("/")) for v in args.visits}
        bad = sel - set(reviewable)
        if bad:
            raise AdminError(f"not a finished visit of {args.output_dir}: "
                             f"{', '.join('/'.join(b) for b in sorted(bad))}")
        wanted = [v for v in reviewable if v in sel]
    per_visit = _settings_for_db(store, None).readers_per_visit
    readers = list(dict.fromkeys(args.readers))
    if len(readers) < per_visit:
        raise AdminError(f"give at least {per_visit} readers (each visit is read {per_visit} "
                         f"time(s), review.readers_per_visit)")
    # check every name before writing anything
    for names, role in ((readers, "reader"), (args.adjudicators, "adjudicator")):
        for name in names:
            user = store.user_by_name(name)
            if user is None:
                raise AdminError(f"no user {name!r}")
            if user["role"] != role:
                raise AdminError(f"{name} is a {user['role']}, not a {role}")
    store.add_visits(wanted)
    ids = {(v["participant_id"], v["session_id"]): v["id"] for v in store.visits()}
    rng = secrets.SystemRandom()
    load = {r: 0 for r in readers}
    adj_load = {a: 0 for a in args.adjudicators}
    n = 0
    for key in wanted:
        vid = ids[key]
        have = [store.user(a["user_id"])["username"] for a in store.assignments_for_visit(vid)
                if a["kind"] == "read"]
        need = per_visit - len(have)
        pool = [r for r in readers if r not in have]
        rng.shuffle(pool)
        pool.sort(key=lambda r: load[r])
        for r in pool[:max(need, 0)]:
            store.assign(vid, r, "read")
            load[r] += 1
            n += 1
        if adj_load and not any(a["kind"] == "adjudication"
                                for a in store.assignments_for_visit(vid)):
            adj = min(adj_load, key=lambda a: (adj_load[a], rng.random()))
            store.assign(vid, adj, "adjudication")
            adj_load[adj] += 1
    print(f"{n} new read assignment(s) over {len(wanted)} visit(s); reads per reader: "
          + ", ".join(f"{r}={c}" for r, c in load.items()))


def _status(args, store) -> None:
    from lesionpipe.review.service import ReviewService

    service = ReviewService(store, args.output_dir, _settings_for_db(store, None))
    print(f"{'visit':<24} {'status':<20} assignments")
    for v in store.visits():
        st = service.visit_status(v["id"])
        parts = []
        for a in store.assignments_for_visit(v["id"]):
            who = store.user(a["user_id"])["username"]
            signed = "signed" if store.is_signed(a["id"]) else "open"
            label = f"R{a['slot']}" if a["kind"] == "read" else "ADJ"
            parts.append(f"{label}:{who}:{a['code']}:{signed}")
        print(f"{v['participant_id'] + '/' + v['session_id']:<24} {st['status']:<20} "
              + " ".join(parts))


def export_cli(args) -> int:
    from lesionpipe.review.export import export_review
    from lesionpipe.review.service import ReviewService
    from lesionpipe.review.store import ReviewError, Store
    from lesionpipe.review.visitdata import OutputError

    if not args.db.is_file():
        print(f"lesionpipe review-export: error: database {args.db} not found", file=sys.stderr)
        return 2
    out = args.out or args.db.resolve().parent / "review_export"
    try:
        out_r, src = out.resolve(), args.output_dir.resolve()
        if out_r == src or src in out_r.parents:
            raise AdminError(f"--out {out} is inside OUTPUT_DIR; the pipeline outputs are read "
                             "only, choose another folder")
        store = Store(args.db)
        service = ReviewService(store, args.output_dir, _settings_for_db(store, None))
        summary = export_review(service, out)
    except (OutputError, AdminError) as exc:
        print(f"lesionpipe review-export: error: {exc}", file=sys.stderr)
        return 2
    except ReviewError as exc:
        print(f"lesionpipe review-export: error: {exc}", file=sys.stderr)
        return 1
    print(f"exported to {out}: " + ", ".join(f"{k}={v}" for k, v in summary["visits"].items()))
    return 0


__all__ = ["add_review_parsers", "serve_cli", "admin_cli", "export_cli"]

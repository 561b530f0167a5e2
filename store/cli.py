# Why this is one module: every `edgemart store` and `seller` command: argument parsing and output only, each handler a few lines over the services.
"""`edgemart store serve|create-user` and `edgemart seller upload`.

Only stdlib and drm.errors at import time: Flask, SQLAlchemy and the packagers load inside the handlers."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgemart.core.errors import UsageError

log = logging.getLogger("edgemart.store.cli")

ROLES = ("seller", "buyer", "builder", "admin")


def _data_dir_default() -> str:
    return os.environ.get("EDGEMART_DATA_DIR") or "edgemart-data"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``store`` and ``seller`` groups."""
    _register_store(sub)
    _register_seller(sub)


def _register_store(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    store = sub.add_parser("store", help="run the store server, create users")
    ssub = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)

    p = ssub.add_parser("serve", help="run the store (gunicorn when installed, else the werkzeug server)")
    p.add_argument(
        "--data-dir",
        default=_data_dir_default(),
        help="store data dir (default $EDGEMART_DATA_DIR or ./edgemart-data)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="web worker processes (gunicorn)")
    p.set_defaults(func=serve)

    p = ssub.add_parser(
        "worker", help="run packaging jobs in this process (scale-out: any number, on any machine)"
    )
    p.add_argument("--data-dir", default=_data_dir_default())
    p.add_argument("--once", action="store_true", help="exit when no job is runnable (instead of waiting)")
    p.set_defaults(func=worker)

    p = ssub.add_parser("migrate", help="bring the database schema to the newest revision, create keys")
    p.add_argument("--data-dir", default=_data_dir_default())
    p.set_defaults(func=migrate)

    p = ssub.add_parser("gc", help="delete blobs no row references (left by crashed uploads)")
    p.add_argument("--data-dir", default=_data_dir_default())
    p.add_argument(
        "--older-than",
        type=float,
        default=3600,
        metavar="SECONDS",
        help="spare blobs younger than this (uploads in flight; default 3600)",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=gc)

    p = ssub.add_parser("tokens", help="list a user's API tokens, or revoke them (a stolen token)")
    p.add_argument("name", help="the user")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--revoke", type=int, metavar="ID", help="revoke the token with this id")
    group.add_argument(
        "--revoke-all", action="store_true", help="revoke every token of the user and end their web sessions"
    )
    p.add_argument("--data-dir", default=_data_dir_default())
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=tokens)

    p = ssub.add_parser("create-user", help="create a user and print an API token")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--password", help="also allow web login with this password (or set EDGEMART_PASSWORD)")
    p.add_argument("--data-dir", default=_data_dir_default())
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=create_user)


def _register_seller(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    seller = sub.add_parser("seller", help="upload models to a store")
    ssub = seller.add_subparsers(dest="seller_command", metavar="COMMAND", required=True)
    p = ssub.add_parser(
        "upload",
        help="upload a model (a new listing, or with --listing a new version of one):"
        " compliance gate, then packaging per target",
    )
    p.add_argument("model", type=Path)
    p.add_argument("--name", help="the new listing's name (required without --listing)")
    p.add_argument(
        "--listing",
        metavar="ID",
        help="publish a new version of this listing of yours; license, card, targets and options default"
        " to the previous version's",
    )
    p.add_argument("--license", help="SPDX license expression (required without --listing)")
    p.add_argument("--card", type=Path, help="model card (Markdown with YAML front matter)")
    p.add_argument(
        "--targets", help="comma-separated targets (default arm-cpu; with --listing the previous version's)"
    )
    p.add_argument("--calibration", type=Path, help=".npz calibration samples keyed by input name (or x)")
    _store_options(p)
    p.add_argument("--eval-days", type=int, help="days an evaluation license lasts (default 14)")
    p.add_argument("--eval-runs", type=int, help="runs an evaluation license allows (default 1000)")
    p.add_argument(
        "--price", type=int, metavar="CENTS", help="price per production seat in cents (default 0)"
    )
    p.add_argument("--visibility", choices=("public", "private"))
    _option_flag(p)
    p.add_argument("--wait", action="store_true", help="wait for the packaging jobs (progress on stderr)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=seller_upload)

    text = (
        "package a version again with new targets, options or calibration (builds no license names are"
        " replaced; a licensed build stays: publish a new version to change it)"
    )
    p = ssub.add_parser("repackage", help=text, description=text)
    p.add_argument("listing", help="the listing id")
    p.add_argument("--version", type=int, metavar="V", help="the version (default the newest)")
    p.add_argument("--targets", required=True, help="comma-separated targets to build (again)")
    p.add_argument("--calibration", type=Path, help="new .npz calibration samples for this version")
    _option_flag(p)
    _store_options(p)
    p.add_argument("--wait", action="store_true", help="wait for the packaging jobs (progress on stderr)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=seller_repackage)

    for name, handler, text in (
        ("unpublish", seller_unpublish, "take a listing off the store (issued licenses keep running)"),
        ("delete", seller_delete, "delete a listing no license was ever issued for"),
    ):
        p = ssub.add_parser(name, help=text, description=text)
        p.add_argument("listing", help="the listing id")
        _store_options(p)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=handler)


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--token", default=os.environ.get("EDGEMART_TOKEN"), help="API token (or $EDGEMART_TOKEN)")


def _option_pairs(args: argparse.Namespace) -> list[str]:
    """--option pairs plus --fixed and --state as the `fixed=` / `state=` options they stand for."""
    pairs = list(args.option)
    for flag, key in ((args.fixed, "fixed"), (args.state, "state")):
        if flag:
            pairs.append(f"{key}={','.join(flag)}")
    return pairs


def _option_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="[TARGET:]KEY=VALUE",
        help="packager option for one target (arm-cpu:min_agreement=0.99) or, without TARGET, for every"
        " target; repeatable (see `edgemart package --help`)",
    )
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input that always gets VALUE (e.g. sr=16000): no calibration array needed (repeatable; "
        "shorthand for --option fixed=...)",
    )
    p.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="IN=OUT",
        help="recurrent state pair, e.g. state=stateN (repeatable; shorthand for --option state=...)",
    )


# ------------------------------------------------------------------------------------------ store


def _private_files(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a store command under umask 077: what it creates (data dir, database, keys, blobs, secret.key) is
    for the store's account only. The old umask comes back after (commands also run inside test processes)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        old = os.umask(0o077)
        try:
            return command(args)
        finally:
            os.umask(old)

    return run


@_private_files
def serve(args: argparse.Namespace) -> int:
    from store.context import check_key_dir, open_context, resolve_config, secret_key

    config = {"DATA_DIR": str(Path(args.data_dir).resolve())}
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    check_key_dir(resolve_config(config))
    # Migrate and create keys once, before any worker process starts.
    ctx = open_context(config)
    secret_key(ctx.config)
    ctx.close()
    from store.logs import configure as configure_logging
    from store.logs import gunicorn_logconfig

    configure_logging()
    log.info(
        "edgemart store: data in %s, listening on http://%s:%s",
        config["DATA_DIR"],
        args.host,
        args.port,
        extra={"fields": {"database": ctx.engine.url.render_as_string(), "workers": args.workers}},
    )
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        BaseApplication = None  # noqa: N806
    if BaseApplication is None:
        from store.app import create_app

        create_app(config).run(host=args.host, port=args.port, threaded=True, use_reloader=False)
        return 0

    class _Gunicorn(BaseApplication):  # type: ignore[misc, valid-type]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", 4)
            self.cfg.set("timeout", 600)
            self.cfg.set("graceful_timeout", 20)
            self.cfg.set("accesslog", None)  # the app writes one structured access record per request
            self.cfg.set("logconfig_dict", gunicorn_logconfig())
            self.cfg.set("control_socket_disable", True)  # one per host would clash between stores

        def load(self) -> Any:
            from store.app import create_app

            configure_logging()
            return create_app(config)

    _Gunicorn().run()
    return 0


def _context(args: argparse.Namespace, **extra: Any) -> Any:
    from store.context import open_context

    return open_context({"DATA_DIR": str(Path(args.data_dir).resolve()), **extra})


@_private_files
def worker(args: argparse.Namespace) -> int:
    """Claim and run jobs until SIGTERM/SIGINT (the job in hand is finished first) or, with --once, until
    nothing is runnable. A worker killed outright loses nothing: its job is re-queued by the others."""
    import signal

    from store.app import worker_loop
    from store.logs import configure as configure_logging

    configure_logging(logging.INFO)
    ctx = _context(args, WORKER="none")
    loop = worker_loop(ctx)

    def _stop(signum: int, _frame: Any) -> None:
        log.info("edgemart worker: signal %d, stopping after the current job", signum)
        loop.stopping.set()
        loop.wake.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("edgemart worker: pid %d, database %s", os.getpid(), ctx.engine.url.render_as_string())
    try:
        if args.once:
            loop.drain()
        else:
            loop.run_forever()
    finally:
        ctx.close()
    log.info("edgemart worker: ran %d job(s)", loop.jobs_run, extra={"fields": {"jobs_run": loop.jobs_run}})
    return 0


@_private_files
def migrate(args: argparse.Namespace) -> int:
    from store.context import secret_key

    ctx = _context(args, WORKER="none")
    try:
        secret_key(ctx.config)
        print(f"schema up to date on {ctx.engine.url.render_as_string()}")
    finally:
        ctx.close()
    return 0


@_private_files
def gc(args: argparse.Namespace) -> int:
    from edgemart.core.output import emit
    from store.services.maintenance import sweep_orphan_blobs

    ctx = _context(args, WORKER="none")
    try:
        report = sweep_orphan_blobs(ctx, older_than=args.older_than, dry_run=args.dry_run)
        stale = 0 if args.dry_run else ctx.blobs.sweep_temp(max(args.older_than, 600))
    finally:
        ctx.close()
    verb = "would delete" if args.dry_run else "deleted"
    emit(
        args,
        report.to_dict() | {"dry_run": args.dry_run, "stale_partial_writes_removed": stale},
        f"scanned {report.scanned} blobs: {report.referenced} referenced, {report.young} young orphans kept, "
        f"{verb} {len(report.deleted)}; {stale} stale partial writes removed",
    )
    return 0


@_private_files
def tokens(args: argparse.Namespace) -> int:
    """The operator's view of a user's tokens; revocation takes effect on the next request."""
    from sqlalchemy import select

    from edgemart.core.errors import NotFoundError
    from edgemart.core.output import emit, iso_utc
    from store.models import User
    from store.services import accounts

    ctx = _context(args, WORKER="none")
    try:
        with ctx.Session() as s:
            user = s.scalar(select(User).where(User.name == args.name))
            if user is None:
                raise NotFoundError(f"no user {args.name[:64]!r}")
            targets: list[int] = []
            if args.revoke_all:  # a compromised account: its web sessions end too
                targets = accounts.revoke_everything(s, user, now=ctx.now())
            elif args.revoke is not None:
                if args.revoke not in {r.id for r in accounts.list_tokens(s, user)}:
                    raise NotFoundError(f"user {args.name} has no token {args.revoke}")
                accounts.revoke_token(s, user, args.revoke, now=ctx.now())
                targets = [args.revoke]
            s.commit()
            items = [accounts.token_to_dict(r) for r in accounts.list_tokens(s, user)]
    finally:
        ctx.close()
    lines = [
        f"{t['id']:>5}  {t['prefix']}…  {t['role']:<8} created {iso_utc(t['created_at'])}  "
        + (
            f"revoked {iso_utc(t['revoked_at'])}"
            if t["revoked_at"]
            else f"last used {iso_utc(t['last_used_at'])}"
        )
        for t in items
    ]
    note = f"revoked {len(targets)} token(s)\n" if targets else ""
    if args.revoke_all:
        note += "ended every web session\n"
    emit(
        args,
        {"user": args.name, "revoked": targets, "tokens": items},
        note + ("\n".join(lines) or "no tokens"),
    )
    return 0


@_private_files
def create_user(args: argparse.Namespace) -> int:
    from store.services import accounts

    ctx = _context(args, WORKER="none")
    try:
        password = args.password or os.environ.get("EDGEMART_PASSWORD")
        with ctx.Session() as s:
            user = accounts.create_user(s, args.name, args.role, now=ctx.now(), password=password)
            token = accounts.issue_token(s, user, now=ctx.now())
            s.commit()
    finally:
        ctx.close()
    if args.json:
        print(json.dumps({"name": args.name, "role": args.role, "token": token}))
    else:
        print(f"created {args.role} {args.name!r}; API token (shown once):")
        print(f"token: {token}")
    return 0


# ------------------------------------------------------------------------------------------ seller


def _job_progress() -> Any:
    """The --wait progress line: one bar per target, drawn by edge_runtime.progress."""
    from edgemart.core.progress import LineProgress, bar

    line = LineProgress()

    def show(states: dict[str, dict[str, Any]]) -> None:
        fractions = [float(s.get("progress") or 0.0) for s in states.values()]
        text = "  ".join(
            f"{s.get('target', '?')} {bar(float(s.get('progress') or 0.0))} "
            f"{float(s.get('progress') or 0.0) * 100:3.0f}% {s.get('state')}"
            for s in states.values()
        )
        line.update(sum(fractions) / max(1, len(fractions)), text)

    show.line = line  # type: ignore[attr-defined]
    return show


def _failures(states: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each job that did not end in a build: target, state and the store's reason and next step."""
    out = []
    for job_id, v in states.items():
        if v.get("state") == "done":
            continue
        failure = v.get("failure") or {}
        out.append(
            {
                "job": job_id,
                "target": v.get("target"),
                "state": v.get("state"),
                "code": failure.get("code"),
                "reason": failure.get("reason") or v.get("error") or v.get("message") or "no reason given",
                "next_step": failure.get("next_step"),
            }
        )
    return out


def _target_options(pairs: list[str], targets: list[str]) -> dict[str, dict[str, str]]:
    """``[TARGET:]KEY=VALUE`` items -> {target: {key: value}}; without TARGET an option applies to every
    target. The store checks each value against the target's typed options and reports every problem."""
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        head, sep, value = pair.partition("=")
        target, colon, key = head.rpartition(":") if ":" in head else ("", "", head)
        if not sep or not key.strip():
            raise UsageError(f"--option expects [TARGET:]KEY=VALUE, got {pair!r}")
        if colon and target.strip() not in targets:
            raise UsageError(
                f"--option {pair!r} names target {target!r}, not one of --targets {','.join(targets)}"
            )
        for t in [target.strip()] if colon else targets:
            if key.strip() in out.setdefault(t, {}):
                raise UsageError(f"--option {key.strip()} given twice for {t}")
            out[t][key.strip()] = value
    return out


def seller_upload(args: argparse.Namespace) -> int:
    from store.client import StoreClient, StoreRefusal

    if not args.token:
        raise UsageError("--token is required (or set EDGEMART_TOKEN)")
    if args.listing is None and (args.name is None or args.license is None):
        raise UsageError("a new listing needs --name and --license (or give --listing ID for a new version)")
    targets = [
        t.strip() for t in (args.targets or ("" if args.listing else "arm-cpu")).split(",") if t.strip()
    ]
    extra = {}
    if args.eval_days is not None:
        extra["eval_days"] = str(args.eval_days)
    if args.eval_runs is not None:
        extra["eval_runs"] = str(args.eval_runs)
    if args.visibility:
        extra["visibility"] = args.visibility
    if args.price is not None:
        extra["price_per_seat"] = str(args.price)
    pairs = _option_pairs(args)
    if pairs:
        if not targets:
            raise UsageError("--option, --fixed and --state need --targets when publishing a new version")
        extra["options"] = json.dumps(_target_options(pairs, targets), sort_keys=True)
    client = StoreClient(args.store, args.token)
    try:
        result = client.upload(
            args.model,
            name=args.name,
            license=args.license,
            targets=targets,
            card=args.card,
            calibration=args.calibration,
            extra=extra,
            listing=args.listing,
        )
    except StoreRefusal as exc:
        body = getattr(exc, "body", {})
        if args.json:
            print(json.dumps(body, sort_keys=True))
        else:
            sys.stderr.write(f"edgemart: {exc.message}\n")
            for finding in (body.get("decision") or {}).get("findings", []):
                if isinstance(finding, dict):
                    sys.stderr.write(
                        f"  - [{finding.get('severity', '')}] {finding.get('message', finding)}\n"
                    )
        return 1
    except UsageError as exc:
        raise _one_line(exc) from None
    listing, version = result["listing"], result.get("version") or {}
    out: dict[str, Any] = {
        "listing": listing["id"],
        "version": version.get("number"),
        "decision": (version.get("decision") or {}).get("outcome"),
        "jobs": result["jobs"],
    }
    if not args.json:
        print(
            f"listing {listing['id']} version {out['version']}: compliance {out['decision']};"
            f" {len(result['jobs'])} packaging job(s) queued"
        )
    return _follow_jobs(args, client, out)


def _one_line(exc: UsageError) -> UsageError:
    """A refusal listing several problems, as the one line the CLI prints."""
    problems = exc.details if isinstance(exc.details, list) else []
    if len(problems) > 1:
        return UsageError(
            "; ".join(str(p.get("message", p)) if isinstance(p, dict) else str(p) for p in problems)
        )
    return exc


def seller_repackage(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    client = _seller_client(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    fields = {"targets": ",".join(targets)}
    if args.version is not None:
        fields["version"] = str(args.version)
    if pairs := _option_pairs(args):
        fields["options"] = json.dumps(_target_options(pairs, targets), sort_keys=True)
    files = {"calibration": args.calibration} if args.calibration is not None else {}
    try:
        result = client.post_multipart(
            f"/api/v1/listings/{quote(args.listing, safe='')}/repackage", fields, files
        )
    except UsageError as exc:
        raise _one_line(exc) from None
    version = result["version"]
    out: dict[str, Any] = {
        "listing": result["listing"]["id"],
        "version": version["number"],
        "jobs": result["jobs"],
    }
    if not args.json:
        print(
            f"listing {out['listing']} version {out['version']}: {len(result['jobs'])} packaging job(s) queued"
        )
    return _follow_jobs(args, client, out)


def _follow_jobs(args: argparse.Namespace, client: Any, out: dict[str, Any]) -> int:
    """Print ``out`` (--json), or with --wait follow its jobs to their end; 1 when any of them failed."""
    if not args.wait:
        if args.json:
            print(json.dumps(out, sort_keys=True))
        return 0
    progress = None if args.json else _job_progress()
    try:
        states = client.wait_jobs(out["jobs"], on_update=progress)
    finally:
        if progress is not None:
            progress.line.clear()  # type: ignore[attr-defined]
    failures = _failures(states)
    out["results"] = {
        v.get("target", k): {"state": v.get("state"), "error": v.get("error"), "failure": v.get("failure")}
        for k, v in states.items()
    }
    out["failures"] = failures
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 1 if failures else 0
    for v in states.values():
        if v.get("state") == "done":
            print(f"{v.get('target')}: done")
    for f in failures:
        sys.stderr.write(f"edgemart: {f['target']} {f['state']}: {f['reason']}\n")
        if f["next_step"]:
            sys.stderr.write(f"  next: {f['next_step']}\n")
    return 1 if failures else 0


def _seller_client(args: argparse.Namespace) -> Any:
    from store.client import StoreClient

    if not args.token:
        raise UsageError("--token is required (or set EDGEMART_TOKEN)")
    return StoreClient(args.store, args.token)


def seller_unpublish(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from edgemart.core.output import emit

    listing = _seller_client(args).post_json(f"/api/v1/listings/{quote(args.listing, safe='')}/unpublish", {})
    emit(
        args,
        listing,
        f"unpublished {listing['id']}: no new licenses; issued ones keep running until they run out",
    )
    return 0


def seller_delete(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from edgemart.core.output import emit

    doc = _seller_client(args).request("DELETE", f"/api/v1/listings/{quote(args.listing, safe='')}").json()
    emit(args, doc, f"deleted {doc['deleted']}")
    return 0

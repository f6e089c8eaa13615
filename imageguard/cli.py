"""The ``imageguard`` command line.

``serve DIR``   a hardened image server for a folder (127.0.0.1:8000 by default)
``scan FILE..`` validate and re-encode files offline; exit 1 if any is rejected
``sign PATH``   print a signed URL (needs IMAGEGUARD_SECRET_KEY); ``sign --remote URL`` for a remote image
``keygen``      print a new secret key
``config``      print the effective settings, secrets redacted
``cache stats|verify|purge``  the disk (L2) and Redis (L3) tiers of IMAGEGUARD_DISK_CACHE_DIR
                and IMAGEGUARD_REDIS_URL

Exit codes: 0 success, 1 a scanned file was rejected or a cache entry is
tampered, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from . import __version__
from .config import Settings
from .core import Core, Entry, FillPlan, parse_transform
from .errors import ConfigError, Rejected
from .logs import configure_root

#: Files in one scan from which on a progress bar is shown.
PROGRESS_THRESHOLD = 5
_EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "webp": ".webp", "avif": ".avif", "svg": ".svg"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageguard", description="Make image serving safe to cache.")
    parser.add_argument("--version", action="version", version=f"imageguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a folder of images through imageguard")
    serve.add_argument("directory", type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--metrics", type=int, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT"
    )

    scan = commands.add_parser("scan", help="validate and re-encode files offline")
    scan.add_argument("files", nargs="+", type=Path)
    scan.add_argument("--out", type=Path, help="write clean copies into this folder")
    _transform_options(scan)

    sign = commands.add_parser("sign", help="print a signed URL for a path or a remote image")
    sign.add_argument("path", nargs="?", help="the image's path (/static/cat.jpg)")
    sign.add_argument(
        "--remote", metavar="URL", help="a remote image URL (IMAGEGUARD_REMOTE_HOSTS) instead of a path"
    )
    _transform_options(sign)
    sign.add_argument("--e", type=int, help="expiry, unix seconds")
    sign.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a source parameter (IMAGEGUARD_SOURCE_PARAMS); repeatable",
    )

    commands.add_parser("keygen", help="print a new random secret key")

    config = commands.add_parser("config", help="print the effective settings (secrets redacted)")
    config.add_argument("--json", action="store_true", help="as JSON")

    cache = commands.add_parser("cache", help="inspect, verify or purge the disk and Redis tiers")
    actions = cache.add_subparsers(dest="action", required=True)
    stats = actions.add_parser("stats", help="entries, bytes and counters of each tier")
    stats.add_argument("--json", action="store_true", help="as JSON")
    actions.add_parser("verify", help="check every entry's integrity tag; exit 1 if any is tampered")
    purge = actions.add_parser("purge", help="drop entries from every tier and every instance")
    target = purge.add_mutually_exclusive_group(required=True)
    target.add_argument("--path", help="every variant of this source path (/static/cat.jpg)")
    target.add_argument("--key", help="one entry by its cache key")
    target.add_argument("--all", action="store_true", help="everything (bumps the generation)")
    return parser


def _transform_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--w", type=int, help="width in pixels")
    parser.add_argument("--h", type=int, help="height in pixels")
    parser.add_argument("--fit", choices=("contain", "cover", "fill"))
    parser.add_argument("--q", type=int, help="quality 1-100")
    parser.add_argument("--fmt", choices=("jpeg", "png", "webp", "avif", "gif"))


def _transform_params(args: argparse.Namespace) -> dict[str, str]:
    return {
        name: str(getattr(args, name))
        for name in ("w", "h", "fit", "q", "fmt")
        if getattr(args, name) is not None
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        if args.command == "keygen":
            print(secrets.token_urlsafe(32))
            return 0
        settings = Settings.from_env()
        if args.command == "config":
            return _config(settings, as_json=args.json)
        if args.command == "sign":
            return _sign(settings, args, err)
        if args.command == "scan":
            return _scan(settings, args, err)
        if args.command == "serve":
            return _serve(settings, args, err)
        if args.command == "cache":
            return _cache(settings, args, err)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}", highlight=False)
        return 2
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees one


def _config(settings: Settings, *, as_json: bool) -> int:
    values = settings.redacted()
    if as_json:
        print(
            json.dumps(
                {k: v if isinstance(v, (int, bool, type(None))) else str(v) for k, v in values.items()},
                indent=2,
            )
        )
        return 0
    table = Table("variable", "value", title="imageguard settings")
    for name, value in values.items():
        table.add_row(f"IMAGEGUARD_{name.upper()}", str(value))
    Console().print(table)
    return 0


def _sign(settings: Settings, args: argparse.Namespace, err: Console) -> int:
    if settings.ephemeral_key:
        err.print(
            "[red]IMAGEGUARD_SECRET_KEY is not set:[/] a URL signed with an ephemeral key "
            "works nowhere. Run `imageguard keygen` and export the key."
        )
        return 2
    params: dict[str, object] = dict(_transform_params(args))
    if args.e is not None:
        params["e"] = args.e
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            err.print(f"[red]--param needs NAME=VALUE, got {item!r}[/]")
            return 2
        params[name] = value
    if (args.path is None) == (args.remote is None):
        err.print("[red]give a PATH or --remote URL[/] (one of them)")
        return 2
    try:
        print(Core(settings.replace(cache_bytes=0), lower=()).url(args.path, remote=args.remote, **params))
    except (ValueError, Rejected) as exc:
        err.print(f"[red]cannot sign:[/] {exc}", highlight=False)
        return 2
    return 0


def _scan(settings: Settings, args: argparse.Namespace, err: Console) -> int:
    core = Core(settings.replace(cache_bytes=0), lower=())  # offline: stores nothing
    try:
        transform = parse_transform(_transform_params(args), max_side=settings.max_side)
    except Rejected as exc:
        err.print(f"[red]bad transform:[/] {exc}", highlight=False)
        return 2
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    out = Console()
    rejected = 0
    with Progress(
        console=err, transient=True, disable=len(args.files) < PROGRESS_THRESHOLD or not err.is_terminal
    ) as progress:
        task = progress.add_task("scanning", total=len(args.files))
        for path in args.files:
            try:
                data = path.read_bytes()
                declared = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                plan = FillPlan(
                    key=path.name,
                    path="/" + path.name,
                    upstream_query="",
                    upstream_host=None,
                    transform=transform,
                    head=False,
                    if_none_match=None,
                    client=None,
                )
                outcome = core.complete(plan, 200, [("Content-Type", declared)], data)
            except OSError as exc:
                rejected += 1
                out.print(f"REJECTED {path}: unreadable ({exc.strerror})", highlight=False)
            except Rejected as exc:
                rejected += 1
                out.print(f"REJECTED {path}: {exc.reason} ({exc.message})", highlight=False)
            else:
                assert isinstance(outcome, Entry)
                line = f"OK {path}: {outcome.content_type}, {len(data)} -> {len(outcome.body)} bytes"
                if args.out is not None:
                    fmt = outcome.content_type.split("/")[1].replace("svg+xml", "svg")
                    target = args.out / (path.stem + _EXTENSIONS.get(fmt, "." + fmt))
                    target.write_bytes(outcome.body)
                    line += f" -> {target}"
                out.print(line, highlight=False)
            progress.advance(task)
    if len(args.files) > 1:
        out.print(f"{len(args.files) - rejected} clean, {rejected} rejected", highlight=False)
    return 1 if rejected else 0


def _cache(settings: Settings, args: argparse.Namespace, err: Console) -> int:
    if settings.disk_cache_dir is None and settings.redis_url is None:
        err.print(
            "[red]no cache tier configured:[/] set IMAGEGUARD_DISK_CACHE_DIR and/or IMAGEGUARD_REDIS_URL"
        )
        return 2
    if settings.ephemeral_key:
        err.print(
            "[red]IMAGEGUARD_SECRET_KEY is not set:[/] entries are sealed and keyed with the "
            "servers' key; export the same key here."
        )
        return 2
    core = Core(settings.replace(cache_bytes=0), listen=False)
    try:
        if args.action == "stats":
            return _cache_stats(core, as_json=args.json)
        if args.action == "verify":
            return _cache_verify(core, err)
        return _cache_purge(core, args, err)
    finally:
        core.close()


def _fleet(core: Core) -> dict[str, object] | None:
    """Hit ratio per tier and rejections by reason of every instance (Redis counters), or ``None``."""
    shared = next((t for t in core.lower if hasattr(t, "counters")), None)
    if shared is None:
        return None
    counters: dict[str, int] = shared.counters()
    tiers: dict[str, object] = {}
    for tier in ("l1", "l2", "l3"):
        hits, misses = counters.get(f"{tier}.hits", 0), counters.get(f"{tier}.misses", 0)
        if hits or misses:
            tiers[tier] = {
                "hits": hits,
                "misses": misses,
                "hit_ratio": round(hits / (hits + misses), 4),
                "integrity_failures": counters.get(f"{tier}.integrity_failures", 0),
            }
    rejections = {k.partition(".")[2]: v for k, v in counters.items() if k.startswith("rejections.")}
    return {"tiers": tiers, "rejections": dict(sorted(rejections.items(), key=lambda kv: -kv[1]))}


def _cache_stats(core: Core, *, as_json: bool) -> int:
    tiers = {tier.name: tier.stats() for tier in core.lower}
    fleet = _fleet(core)
    if as_json:
        print(json.dumps({"generation": core.generation, **tiers, "fleet": fleet}, indent=2, default=str))
        return 0
    console = Console()
    table = Table("tier", "counter", "value", title=f"stored entries (generation {core.generation})")
    for name, counters in tiers.items():
        for counter in ("entries", "bytes", "maxbytes", "integrity_failures", "available"):
            if counter in counters:
                table.add_row(name, counter, str(counters[counter]))
    console.print(table)
    if fleet is None:
        console.print(
            "Hit ratios and rejections are counted per process: see guard.stats() or /metrics "
            "(with IMAGEGUARD_REDIS_URL, every instance adds them up here)."
        )
        return 0
    ratios = Table("tier", "hits", "misses", "hit ratio", "integrity failures", title="every instance")
    for name, row in fleet["tiers"].items():  # type: ignore[attr-defined]
        ratios.add_row(
            name,
            str(row["hits"]),
            str(row["misses"]),
            f"{row['hit_ratio']:.1%}",
            str(row["integrity_failures"]),
        )
    console.print(ratios)
    reasons = Table("reason", "rejections", title="rejections by reason, every instance")
    for reason, count in fleet["rejections"].items():  # type: ignore[attr-defined]
        reasons.add_row(reason, str(count))
    console.print(reasons)
    return 0


def _cache_verify(core: Core, err: Console) -> int:
    # Plain print(): one line per finding, never wrapped, for grep and for logs.
    checked = tampered = 0
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        for tier in core.lower:
            task = progress.add_task(f"verifying {tier.name}", total=None)
            for key, detail in tier.verify():
                checked += 1
                if detail is not None:
                    tampered += 1
                    print(f"TAMPERED {tier.name} {key}: {detail}", flush=True)
                progress.advance(task)
    print(f"{checked} entries checked, {tampered} tampered")
    return 1 if tampered else 0


def _cache_purge(core: Core, args: argparse.Namespace, err: Console) -> int:
    if args.all:
        core.purge_all()
        print(f"purged everything (generation {core.generation})")
        return 0
    try:
        removed = core.purge(path=args.path) if args.path is not None else core.purge(key=args.key)
    except ValueError as exc:
        err.print(f"[red]cannot purge:[/] {exc}", highlight=False)
        return 2
    print(f"purged {removed} entr{'y' if removed == 1 else 'ies'}")
    return 0


def _serve(settings: Settings, args: argparse.Namespace, err: Console) -> int:
    from .serve import serve

    if not args.directory.is_dir():
        err.print(f"[red]not a directory:[/] {args.directory}", highlight=False)
        return 2
    # The library never configures logging; the server is an application, so it does.
    configure_root(settings)
    if args.metrics is not None:
        from . import metrics

        if not metrics.AVAILABLE:
            err.print(f"[red]--metrics:[/] {escape(metrics.INSTALL_HINT)}", highlight=False)
            return 2
        try:
            metrics.start_metrics_server(args.metrics)
        except (OSError, OverflowError) as exc:  # in use, not allowed, out of range
            err.print(
                f"[red]cannot serve metrics on 127.0.0.1:{args.metrics}:[/] {escape(str(exc))}",
                highlight=False,
            )
            return 2
        print(f"imageguard metrics on http://127.0.0.1:{args.metrics}/metrics", flush=True)
    serve(args.directory, args.host, args.port, settings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

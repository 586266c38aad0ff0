"""Command line: the only module that reads argv or the environment, or exits the process.

sidecar run --config config.toml
sidecar check-config --config config.toml
sidecar accounts import --config config.toml --provider NAME < tokens.jsonl
sidecar accounts connect --config config.toml --provider NAME --account A
sidecar accounts list|authorize|refresh|revoke --config config.toml --provider NAME ...
sidecar keys generate
sidecar keys rotate --config config.toml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

from sidecar import config as config_module
from sidecar import logs
from sidecar.app import Sidecar, open_accounts
from sidecar.config import Config
from sidecar.credentials.accounts import AccountService, InvalidInput, ListQuery
from sidecar.credentials.maintenance import (
    BadImport,
    check_keys,
    clamped_settings,
    import_credentials,
    parse_import,
    rotate_keys,
)
from sidecar.crypto import TokenCipher, generate_key
from sidecar.errors import ConfigError, ListenError, SidecarError, StoreError
from sidecar.model import AccountState
from sidecar.store import open_store
from sidecar.store.sqlite import sqlite_path
from sidecar.tasks import Tasks

log = logging.getLogger("sidecar")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _print_problems(exc.problems, sys.stderr)
        return EXIT_USAGE
    except ListenError as exc:  # a port in use is the operator's to fix, like a bad config
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidInput as exc:
        print(f"{len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except SidecarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="command")

    dev = commands.add_parser(
        "dev", help="a demo: token endpoint, API and sidecar on 127.0.0.1, no config needed"
    )
    dev.add_argument("--port", type=int, default=8081, help="proxy port (default 8081)")
    dev.add_argument("--admin-port", type=int, default=9901, help="admin port (default 9901)")
    dev.add_argument(
        "--provider-port", type=int, default=8180, help="demo provider port (default 8180)"
    )
    dev.add_argument("--api-port", type=int, default=8181, help="demo API port (default 8181)")
    dev.set_defaults(func=_dev)

    run = commands.add_parser("run", help="run the proxy listeners and the admin listener")
    _config_arg(run)
    run.set_defaults(func=_run)

    check = commands.add_parser("check-config", help="validate a config file, report every problem")
    _config_arg(check)
    check.add_argument(
        "--online",
        action="store_true",
        help="also fetch each issuer's discovery document and show the endpoints it gives",
    )
    check.set_defaults(func=_check_config)

    accounts = commands.add_parser("accounts", help="manage stored accounts")
    accounts_commands = accounts.add_subparsers(required=True, metavar="action")
    imp = accounts_commands.add_parser(
        "import", help="import token pairs, one JSON object a line, from standard input"
    )
    _config_arg(imp)
    imp.add_argument("--provider", required=True)
    imp.set_defaults(func=_import)
    _account_commands(accounts_commands)

    keys = commands.add_parser("keys", help="manage store encryption keys")
    keys_commands = keys.add_subparsers(required=True, metavar="action")
    keys_commands.add_parser("generate", help="print a new key for the key file").set_defaults(
        func=lambda _: print(generate_key()) or EXIT_OK
    )
    rotate = keys_commands.add_parser("rotate", help="re-encrypt every row with the first key")
    _config_arg(rotate)
    rotate.set_defaults(func=_rotate)
    return parser


def _account_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lst = commands.add_parser("list", help="list accounts with state and expiry (never tokens)")
    _provider_args(lst, account=False)
    lst.add_argument("--state", choices=[s.value for s in AccountState])
    lst.add_argument("--json", action="store_true", help="one JSON object a line")
    lst.set_defaults(func=_list)
    authorize = commands.add_parser(
        "authorize", help="exchange an authorization code for an account's token pair"
    )
    _provider_args(authorize)
    authorize.add_argument("--code", required=True)
    authorize.add_argument("--redirect-uri", required=True)
    authorize.add_argument("--code-verifier", help="the PKCE verifier (RFC 7636)")
    authorize.set_defaults(func=_authorize)
    _connect_command(commands)
    refresh = commands.add_parser("refresh", help="refresh an account's tokens now")
    _provider_args(refresh)
    refresh.set_defaults(func=_refresh)
    revoke = commands.add_parser(
        "revoke", help="revoke an account's tokens at the provider, then delete it"
    )
    _provider_args(revoke)
    revoke.add_argument(
        "--force", action="store_true", help="delete even if the provider does not confirm"
    )
    revoke.set_defaults(func=_revoke)


def _connect_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    connect = commands.add_parser(
        "connect",
        help="sign an account in with a browser and store its token pair",
        description="Print (and, where there is a display, open) the provider's authorization "
        "URL, receive the redirect on a loopback listener, exchange the code (PKCE S256) and "
        "store the account's token pair.",
    )
    _provider_args(connect)
    connect.add_argument(
        "--redirect-uri",
        help="loopback URI to listen on (default: the provider's redirect_uri, else "
        "http://127.0.0.1/callback on a free port)",
    )
    connect.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the sign-in (300)"
    )
    connect.add_argument(
        "--no-browser", action="store_true", help="only print the URL, never open a browser"
    )
    connect.set_defaults(func=_connect)


def _provider_args(parser: argparse.ArgumentParser, account: bool = True) -> None:
    _config_arg(parser)
    parser.add_argument("--provider", required=True)
    if account:
        parser.add_argument("--account", required=True)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="path to the TOML config file")


def _load(args: argparse.Namespace) -> Config:
    return config_module.load(args.config, os.environ)


def _print_problems(problems: list[str], out: TextIO) -> None:
    print(f"{len(problems)} configuration problem(s):", file=out)
    for problem in problems:
        print(f"  {problem}", file=out)


def _check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    url = cfg.store.url
    warnings: list[str] = []
    if url.startswith("sqlite://") and not Path(sqlite_path(url)).exists():
        store = "the store is empty (no database file yet)"  # not created by a check
    else:
        store, warnings = asyncio.run(_check_store(cfg))
    print(f"ok: {len(cfg.providers)} provider(s), {len(cfg.upstreams)} upstream(s); {store}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if getattr(args, "online", False):
        from sidecar.grants.discovery import describe_discovery

        lines, failed = asyncio.run(describe_discovery(cfg.providers))
        print("\n".join(lines))
        return EXIT_FAILED if failed else EXIT_OK
    return EXIT_OK


async def _check_store(cfg: Config) -> tuple[str, list[str]]:
    """Whether the key file decrypts what the store holds (ConfigError when it cannot), and
    the settings the stored tokens' lifetimes cut short (warnings: they work, differently).

    A store that cannot be reached is reported, not refused: the file may be checked where the
    database is not reachable, and ``run`` checks again at start.
    """
    try:
        store = await open_store(cfg.store.url)
    except StoreError as exc:
        return f"the store's keys were not checked: {exc}", []
    try:
        rows = await check_keys(store, TokenCipher(cfg.store.keys))
        warnings = await clamped_settings(store, cfg.providers)
    finally:
        await store.close()
    return f"the configured keys decrypt all {rows} stored row(s)", warnings


def _run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    logs.configure(cfg.log_level)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    return asyncio.run(_serve(cfg))


async def _serve(cfg: Config) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sidecar = await _start_unless_stopped(cfg, stop)
    if sidecar is None:
        log.info("stopped", extra={"before_ready": True})
        return EXIT_OK
    log.info("ready", extra={"listeners": sidecar.addresses})
    await stop.wait()
    log.info("stopping", extra={"grace_seconds": cfg.shutdown_timeout_seconds})
    await sidecar.stop()
    log.info("stopped")
    return EXIT_OK


async def _start_unless_stopped(cfg: Config, stop: asyncio.Event) -> Sidecar | None:
    """Start, unless a signal comes first: start-up may wait a minute for the store, and a
    pod deleted meanwhile must not wait for that. None when stopped before ready."""
    tasks = Tasks()
    starting = tasks.spawn(Sidecar.start(cfg), name="start")
    signalled = tasks.spawn(stop.wait(), name="stop signal")
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        return starting.result() if starting.done() else None
    finally:
        await tasks.close()  # cancels what is still running; a cancelled start cleans up


def _load_for_provider(args: argparse.Namespace) -> Config:
    cfg = _load(args)
    names = [p.name for p in cfg.providers]
    if args.provider not in names:
        raise ConfigError(
            [f"--provider: no provider named {args.provider!r} (configured: {', '.join(names)})"]
        )
    return cfg


def _dev(args: argparse.Namespace) -> int:
    logs.configure("info")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    ports = (args.port, args.admin_port, args.provider_port, args.api_port)
    return asyncio.run(_serve_dev(*ports))


async def _serve_dev(port: int, admin_port: int, provider_port: int, api_port: int) -> int:
    from sidecar.dev import start_dev

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stack = await start_dev(
        time.time,
        proxy_port=port,
        admin_port=admin_port,
        provider_port=provider_port,
        api_port=api_port,
    )
    print(stack.instructions(), flush=True)
    await stop.wait()
    await stack.stop()
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    cfg = _load_for_provider(args)
    provider = cfg.provider(args.provider)
    try:
        creds = parse_import(
            sys.stdin,
            provider.name,
            time.time(),
            need_refresh_token=provider.grant == "refresh_token",
        )
    except BadImport as exc:
        print(f"nothing imported: {len(exc.problems)} bad line(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    asyncio.run(_with_store(cfg, lambda store, cipher: import_credentials(store, cipher, creds)))
    print(f"imported {len(creds)} account(s) into provider {provider.name!r}")
    return EXIT_OK


def _accounts(args: argparse.Namespace, job: Callable[[AccountService], Awaitable[T]]) -> T:
    """Run one job against the account service, opened for this command only."""
    cfg = _load_for_provider(args)
    logs.configure("warning")  # problems as JSON lines on stderr; the outcome on stdout

    async def run() -> T:
        async with open_accounts(cfg) as accounts:
            return await job(accounts)

    return asyncio.run(run())


def _list(args: argparse.Namespace) -> int:
    query = ListQuery(AccountState(args.state) if args.state else None)
    page = _accounts(args, lambda accounts: accounts.list(args.provider, query))
    if args.json:
        for summary in page.accounts:
            print(json.dumps(summary.to_json()))
        return EXIT_OK
    print(f"{'ACCOUNT':24} {'STATE':24} {'ACCESS EXPIRES':20} {'REFRESHED':20} REASON")
    for a in page.accounts:
        print(
            f"{a.account:24} {a.state:24} {_when(a.access_expires_at):20} "
            f"{_when(a.refreshed_at):20} {a.reason or '-'}"
        )
    return EXIT_OK


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _authorize(args: argparse.Namespace) -> int:
    body = {"code": args.code, "redirect_uri": args.redirect_uri}
    if args.code_verifier is not None:
        body["code_verifier"] = args.code_verifier
    stored = _accounts(args, lambda accounts: accounts.authorize(args.provider, args.account, body))
    print(
        f"authorized {'new' if stored.created else 'existing'} account {args.account!r} of "
        f"provider {args.provider!r}; access token expires "
        f"{_when(stored.summary.access_expires_at)}"
    )
    for warning in stored.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _connect(args: argparse.Namespace) -> int:
    from sidecar.connect import connect

    cfg = _load_for_provider(args)
    logs.configure("warning")
    browser = not args.no_browser and _has_display(os.environ)

    def show(url: str, redirect_uri: str) -> None:
        print(
            f"Open this URL to sign in account {args.account!r} of provider {args.provider!r}:\n"
            f"  {url}\nWaiting up to {args.timeout:.0f} s for the redirect to {redirect_uri}",
            flush=True,
        )
        if browser:
            import webbrowser

            webbrowser.open(url)

    login = connect(
        cfg,
        args.provider,
        args.account,
        redirect_uri=args.redirect_uri,
        wait_seconds=args.timeout,
        show=show,
    )
    try:
        stored = asyncio.run(login)
    except KeyboardInterrupt:  # Ctrl-C while waiting for the browser
        print("cancelled: nothing was stored", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"connected {'new' if stored.created else 'existing'} account {args.account!r} of "
        f"provider {args.provider!r}; access token expires "
        f"{_when(stored.summary.access_expires_at)}"
    )
    for warning in stored.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _has_display(environ: Mapping[str, str]) -> bool:
    """Whether a browser can be shown: a desktop session, or macOS and Windows."""
    return sys.platform in ("darwin", "win32") or bool(
        environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY")
    )


def _refresh(args: argparse.Namespace) -> int:
    summary = _accounts(args, lambda accounts: accounts.refresh(args.provider, args.account))
    print(
        f"refreshed account {args.account!r} of provider {args.provider!r}; "
        f"access token expires {_when(summary.access_expires_at)}"
    )
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    outcome = _accounts(
        args, lambda accounts: accounts.revoke(args.provider, args.account, force=args.force)
    )
    how = {
        "revoked": "revoked and deleted",
        "not_configured": "deleted (the provider has no revocation_url)",
        "failed": "deleted WITHOUT revocation (--force)",
    }[outcome]
    print(f"{how} account {args.account!r} of provider {args.provider!r}")
    return EXIT_OK


def _rotate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    changed = asyncio.run(_with_store(cfg, rotate_keys))
    print(f"re-encrypted {changed} row(s) with key {TokenCipher(cfg.store.keys).current_key_id}")
    return EXIT_OK


async def _with_store(cfg: Config, job):  # type: ignore[no-untyped-def]
    store = await open_store(cfg.store.url)
    try:
        return await job(store, TokenCipher(cfg.store.keys))
    finally:
        await store.close()

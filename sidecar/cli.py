"""Command line: the only module that reads argv or the environment, or exits the process.

sidecar run --config config.toml
sidecar check-config --config config.toml
sidecar accounts import --config config.toml --provider NAME < tokens.jsonl
sidecar keys generate
sidecar keys rotate --config config.toml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from sidecar import config as config_module
from sidecar import logs
from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.credentials.maintenance import BadImport, import_credentials, parse_import, rotate_keys
from sidecar.crypto import TokenCipher, generate_key
from sidecar.errors import ConfigError, SidecarError
from sidecar.store import open_store

log = logging.getLogger("sidecar")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _print_problems(exc.problems, sys.stderr)
        return EXIT_USAGE
    except SidecarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="command")

    run = commands.add_parser("run", help="run the proxy listeners and the admin listener")
    _config_arg(run)
    run.set_defaults(func=_run)

    check = commands.add_parser("check-config", help="validate a config file, report every problem")
    _config_arg(check)
    check.set_defaults(func=_check_config)

    accounts = commands.add_parser("accounts", help="manage stored accounts")
    accounts_commands = accounts.add_subparsers(required=True, metavar="action")
    imp = accounts_commands.add_parser(
        "import", help="import token pairs, one JSON object a line, from standard input"
    )
    _config_arg(imp)
    imp.add_argument("--provider", required=True)
    imp.set_defaults(func=_import)

    keys = commands.add_parser("keys", help="manage store encryption keys")
    keys_commands = keys.add_subparsers(required=True, metavar="action")
    keys_commands.add_parser("generate", help="print a new key for the key file").set_defaults(
        func=lambda _: print(generate_key()) or EXIT_OK
    )
    rotate = keys_commands.add_parser("rotate", help="re-encrypt every row with the first key")
    _config_arg(rotate)
    rotate.set_defaults(func=_rotate)
    return parser


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
    print(f"ok: {len(cfg.providers)} provider(s), {len(cfg.upstreams)} upstream(s)")
    return EXIT_OK


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
    sidecar = await Sidecar.start(cfg)
    log.info("ready", extra={"listeners": sidecar.addresses})
    await stop.wait()
    log.info("stopping", extra={"grace_seconds": cfg.shutdown_timeout_seconds})
    await sidecar.stop()
    log.info("stopped")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    cfg = _load(args)
    names = [p.name for p in cfg.providers]
    if args.provider not in names:
        raise ConfigError(
            [f"--provider: no provider named {args.provider!r} (configured: {', '.join(names)})"]
        )
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

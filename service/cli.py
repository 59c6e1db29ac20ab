"""The ``genserve`` command (the console script): ``serve`` runs the HTTP service under uvicorn
(flags override GENSERVE_* variables); every other subcommand is an offline tool of
models/tools/cli.py. ``python -m service.cli serve ...`` is the same command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from models.tools import cli as tools_cli

logger = logging.getLogger("genserve")

# flag -> Settings field, for flags that override the environment
OVERRIDES = {
    "model_dir": "model_dir",
    "models": "models",
    "devices": "devices",
    "max_batch_size": "max_batch_size",
    "max_batch_wait_ms": "max_batch_wait_ms",
    "api_keys": "api_keys",
    "torch_threads": "torch_threads",
    "watch": "watch_interval_s",
    "http_processes": "http_processes",
}
WATCH_DEFAULT_S = 5.0  # `--watch` without a value


def add_parser(sub: Any) -> None:
    """Add the ``serve`` subcommand to genserve's subparsers."""
    s = sub.add_parser("serve", help="serve models over HTTP (see GENSERVE_* variables in the README)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-dir", help="folder of checkpoints (GENSERVE_MODEL_DIR)")
    s.add_argument("--models", help="comma list of model names to serve (GENSERVE_MODELS; default all)")
    s.add_argument("--devices", help="cpu, auto, or a list like cuda:0,cuda:1 (GENSERVE_DEVICES)")
    s.add_argument("--max-batch-size", type=int, help="GENSERVE_MAX_BATCH_SIZE")
    s.add_argument("--max-batch-wait-ms", type=float, help="GENSERVE_MAX_BATCH_WAIT_MS")
    s.add_argument("--api-keys", help="comma list of API keys (GENSERVE_API_KEYS); prefer the variable")
    s.add_argument("--torch-threads", type=int, help="GENSERVE_TORCH_THREADS")
    s.add_argument(
        "--http-processes",
        type=int,
        help="HTTP processes sharing the port, the models in shared servers (GENSERVE_HTTP_PROCESSES)",
    )
    s.add_argument("--json-logs", action="store_true", help="log JSON lines (GENSERVE_JSON_LOGS)")
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=WATCH_DEFAULT_S,
        metavar="SECONDS",
        help=f"reload a model whose folder changed, polling every SECONDS (default {WATCH_DEFAULT_S:g}; "
        "GENSERVE_WATCH_INTERVAL_S)",
    )
    s.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.entries import RegistryError
    from service.metrics import Metrics
    from service.registry import ModelRegistry
    from service.settings import Settings

    overrides: dict[str, Any] = {
        field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None
    }
    if args.json_logs:
        overrides["json_logs"] = True
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            where = ".".join(map(str, err["loc"]))
            what = f"setting {where}" if where else "settings"  # a check across settings names no field
            logger.error("invalid %s: %s", what, err["msg"].removeprefix("Value error, "))
        return 2
    registry = ModelRegistry(settings, Metrics())
    try:
        registry.discover()  # the same check as startup, with a clean message
    except RegistryError as e:
        logger.error("%s", e)
        return 2
    if settings.http_processes > 1:
        from service.http_processes import serve_http_processes

        # The HTTP processes start from a fresh interpreter and read their settings from the environment.
        os.environ.update({f"GENSERVE_{field.upper()}": str(v) for field, v in overrides.items()})
        return serve_http_processes(settings, {n: e.folder for n, e in registry.entries.items()}, args.host, args.port)
    app = create_app(settings)
    logger.info("serving %s on http://%s:%d (docs at /docs)", settings.model_dir, args.host, args.port)
    # On SIGTERM/SIGINT uvicorn stops accepting, lets requests in flight finish for up to
    # shutdown_timeout_s, cancels the rest, then runs the app's shutdown (the workers stop).
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole genserve command: the offline tools' subcommands and ``serve``."""
    return tools_cli.build_parser(extra=[add_parser])


def main(argv: list[str] | None = None) -> int:
    """``genserve``'s entry point."""
    return tools_cli.main(argv, extra=[add_parser])


if __name__ == "__main__":
    sys.exit(main())

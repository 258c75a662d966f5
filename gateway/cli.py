"""``model-gateway``: a thin CLI. Build a validated config, then call one ``run()``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import ConfigError, GatewayConfig, load_config

DEFAULT_CONFIG = "config/gateway.yaml"
log = logging.getLogger("model_gateway")


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get("MODEL_GATEWAY_CONFIG") or DEFAULT_CONFIG


def _use_all_file_descriptors() -> None:
    """Every connection is a file descriptor: take the hard limit, as nginx's
    worker_rlimit_nofile does, so that limits.max_connections is what caps them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config: GatewayConfig, config_path: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT; then drain, stop every runner and return 0."""
    import uvicorn

    from .app import build_app
    from .protocol import server_protocol
    from .server import GatewayServer

    _use_all_file_descriptors()
    app, gateway = build_app(config, config_path=config_path)
    drains = [s.drain_timeout for s in config.endpoint_specs()] or [config.defaults.drain_timeout]
    drain = max(drains)
    # uvloop and httptools explicitly (both come with uvicorn[standard]): "auto" would fall
    # back to asyncio and h11 silently, at several times the cost per request. The proxy
    # logs its own access line, so uvicorn's is off. proxy_headers is off: the client
    # address is the peer's, which the proxy appends to X-Forwarded-For (uvicorn's
    # rewrite would make a trusted proxy's "C" arrive as "C, C").
    server = GatewayServer(uvicorn.Config(
        app, host=config.server.host, port=config.server.port, lifespan="on",
        loop="uvloop", http=server_protocol(), ws="none", access_log=False, log_config=None,
        proxy_headers=False,
        timeout_graceful_shutdown=int(drain) or None, server_header=False,
    ))
    server.on_hangup = gateway.hangup  # SIGHUP re-reads the config file
    server.run()
    return 0 if server.started else 1


def check_config(path: str) -> int:
    config = load_config(path)
    print(json.dumps({"server": config.server.model_dump(), "pool": config.pool.model_dump(),
                      "endpoints": [dataclasses.asdict(s) for s in config.endpoint_specs()]},
                     indent=2))
    return 0


def make_bundle(config_path: str, out: str) -> int:
    from .bundle import BundleError, bundle

    try:
        manifest = bundle(config_path, Path(out))
    except BundleError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    for e in manifest["endpoints"]:
        print(f"{e['name']}/{e['alias']}: version {e['version'] or '-'} -> {out}/{e['path']} "
              f"({e['files']} files, {e['checksum'][:19]}…)")
    print(f"serve it with: model-gateway serve --config {out}/gateway.yaml")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model-gateway",
                                     description="One URL for all of a team's MLflow models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the endpoints of a config file")
    serve.add_argument("--config", "-c", help=f"config file (default: $MODEL_GATEWAY_CONFIG "
                                               f"or {DEFAULT_CONFIG})")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--url-prefix", help="override server.url_prefix")
    serve.add_argument("--log-level", default="INFO")
    _add_anaconda_project_options(serve)
    check = sub.add_parser("check-config", help="validate a config file and print endpoints")
    check.add_argument("path")
    frozen = sub.add_parser("bundle", help="freeze every endpoint's current version into a "
                                           "directory that serves with no registry")
    frozen.add_argument("--config", "-c", help="config file (as for serve)")
    frozen.add_argument("--out", "-o", required=True, help="a new or empty directory")
    args = parser.parse_args(argv)

    from .logs import configure

    configure(getattr(args, "log_level", "INFO"))
    try:
        if args.command == "check-config":
            return check_config(args.path)
        if args.command == "bundle":
            return make_bundle(_config_path(args.config), args.out)
        config_path = _config_path(args.config)
        config = load_config(config_path)
        configure(args.log_level, config.log_format)
        config = _with_overrides(config, args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return run(config, config_path)


def _add_anaconda_project_options(parser: argparse.ArgumentParser) -> None:
    """What an Anaconda project command with ``supports_http_options: true`` is given (an
    ADSP deployment, or ``anaconda-project run``): the address, port and url prefix are
    applied; the rest concern browser apps and are accepted and ignored."""
    group = parser.add_argument_group("Anaconda project HTTP options")
    group.add_argument("--anaconda-project-address", dest="host", help="as --host")
    group.add_argument("--anaconda-project-port", dest="port", type=int, help="as --port")
    group.add_argument("--anaconda-project-url-prefix", dest="url_prefix",
                       help="as --url-prefix")
    for flag in ("--anaconda-project-host", "--anaconda-project-iframe-hosts"):
        group.add_argument(flag, action="append", default=[], metavar="HOST",
                           help="accepted, ignored: the gateway checks no Host or Origin")
    for flag in ("--anaconda-project-no-browser", "--anaconda-project-use-xheaders"):
        group.add_argument(flag, action="store_true",
                           help="accepted, ignored: no browser is opened, and X-Forwarded-* "
                                "are passed on to runners, not trusted")


def _with_overrides(config: GatewayConfig, args: argparse.Namespace) -> GatewayConfig:
    """``config`` with the command line's server settings; validated like the file's."""
    update = {k: v for k in ("host", "port", "url_prefix")
              if (v := getattr(args, k)) is not None}
    if not update:
        return config
    try:
        server = type(config.server).model_validate({**config.server.model_dump(), **update})
    except ValidationError as exc:
        raise ConfigError("command line", [
            f"server.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) \
            from None
    return config.model_copy(update={"server": server})


if __name__ == "__main__":
    sys.exit(main())

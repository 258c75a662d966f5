"""``model-gateway``: a thin CLI. Build a validated config, then call one ``run()``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys

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
                      "endpoints": [vars(s) for s in config.endpoint_specs()]}, indent=2))
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
    serve.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate a config file and print endpoints")
    check.add_argument("path")
    args = parser.parse_args(argv)

    from .logs import configure

    configure(getattr(args, "log_level", "INFO"))
    try:
        if args.command == "check-config":
            return check_config(args.path)
        config_path = _config_path(args.config)
        config = load_config(config_path)
        configure(args.log_level, config.log_format)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.host or args.port is not None:
        server = config.server.model_copy(update={
            k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
        config = config.model_copy(update={"server": server})
    return run(config, config_path)


if __name__ == "__main__":
    sys.exit(main())

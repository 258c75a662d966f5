"""A runner: one process serving MLflow's own scoring app for one model.

``run(ServeOptions(...))`` downloads the model once, loads it and serves
``mlflow.pyfunc.scoring_server`` with uvicorn: the same routes and error answers as
``mlflow models serve``, without the CLI process that stays alive beside it. A forked
runner calls :func:`run` directly (``runners.zygote``); the ``direct`` launcher and
built environments run ``python -m runners.serve`` / ``python serve.py`` with the same
options on the command line (:func:`main`).

This module imports nothing from the gateway's packages: a built model environment runs
it by path, with only MLflow installed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
from dataclasses import dataclass, fields

PR_SET_NAME = 15


@dataclass(frozen=True)
class ServeOptions:
    model_uri: str
    port: int | None = None  # a loopback TCP port, when anything needs one
    unix_socket: str | None = None  # a filesystem socket only the gateway's user reaches
    host: str = "127.0.0.1"
    workers: int = 1
    timeout: int = 60  # MLflow's own request timeout, seconds
    title: str | None = None  # the process title ps shows
    nice: int = 0  # CPU priority below the gateway's (0–19): e.g. a shadow's runner

    def argv(self) -> list[str]:
        """These options as :func:`main` reads them."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out += [f"--{f.name.replace('_', '-')}", str(value)]
        return out


def set_title(title: str) -> None:
    """Name this process for ps and top: the whole command line where setproctitle is
    installed (the gateway's environment), else the 15-character kernel name.

    The title takes the place of the original command line only (SPT_NOENV): the
    environment stays readable in /proc, where a restarted gateway finds the runners of
    the one before it by their owner mark."""
    os.environ["SPT_NOENV"] = "1"
    try:
        import setproctitle
    except ImportError:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0)
        return
    setproctitle.setproctitle(title)


def run(options: ServeOptions) -> int:
    if options.title:
        set_title(options.title)
    if options.nice:  # before loading: every thread and worker it starts inherits it
        os.nice(options.nice)
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(options.timeout)
    import mlflow.artifacts

    if options.port is None and options.unix_socket is None:
        raise SystemExit("runners.serve: give --port, --unix-socket or both")
    local_path = mlflow.artifacts.download_artifacts(options.model_uri)
    if options.workers > 1:
        # Several workers need an import string; MLflow's app module reads the model path
        # from this variable, exactly as `mlflow models serve` arranges it. uvicorn's
        # workers share one listener: the socket, or else the port.
        from mlflow.pyfunc import scoring_server

        os.environ[scoring_server._SERVER_MODEL_PATH] = local_path
        where = ["--uds", options.unix_socket] if options.unix_socket else \
            ["--host", options.host, "--port", str(options.port)]
        os.execv(sys.executable, [sys.executable, "-m", "uvicorn", *where, "--workers",
                                  str(options.workers), "--no-access-log", "--no-proxy-headers",
                                  "mlflow.pyfunc.scoring_server.app:app"])

    import uvicorn
    from mlflow.pyfunc import load_model, scoring_server

    app = scoring_server.init(load_model(local_path))
    # Only the gateway calls a runner: X-Forwarded-For means nothing to it, and reading it
    # would cost every request a little.
    config = uvicorn.Config(app, host=options.host, port=options.port or 0, access_log=False,
                            proxy_headers=False, log_level="info")
    sockets = []
    if options.port is not None:
        sockets.append(config.bind_socket())  # as uvicorn.run would
    if options.unix_socket:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(options.unix_socket)
        sockets.append(unix)
    uvicorn.Server(config).run(sockets=sockets)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.serve")
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--unix-socket", help="serve on this filesystem socket")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--title", help="the process title")
    parser.add_argument("--nice", type=int, default=0, help="lower CPU priority by this")
    return run(ServeOptions(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())

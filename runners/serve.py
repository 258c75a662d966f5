"""The ``direct`` launcher's runner: one process serving MLflow's own scoring app.

``python -m runners.serve --model-uri URI --port P`` downloads the model once, loads it
and serves ``mlflow.pyfunc.scoring_server`` with uvicorn: the same routes and error
answers as ``mlflow models serve``, without the CLI process that stays alive beside it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.serve")
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--abstract-socket", help="also serve on this abstract unix socket "
                                                  "(Linux; one worker only)")
    args = parser.parse_args(argv)

    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(args.timeout)
    import mlflow.artifacts

    local_path = mlflow.artifacts.download_artifacts(args.model_uri)
    if args.workers > 1:
        # Several workers need an import string; MLflow's app module reads the model path
        # from this variable, exactly as `mlflow models serve` arranges it.
        from mlflow.pyfunc import scoring_server

        os.environ[scoring_server._SERVER_MODEL_PATH] = local_path
        os.execv(sys.executable, [sys.executable, "-m", "uvicorn", "--host", args.host,
                                  "--port", str(args.port), "--workers", str(args.workers),
                                  "--no-access-log", "--no-proxy-headers",
                                  "mlflow.pyfunc.scoring_server.app:app"])

    import uvicorn
    from mlflow.pyfunc import load_model, scoring_server

    app = scoring_server.init(load_model(local_path))
    # Only the gateway calls a runner: X-Forwarded-For means nothing to it, and reading it
    # would cost every request a little.
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                            proxy_headers=False, log_level="info")
    sockets = [config.bind_socket()]  # as uvicorn.run would, and also the unix socket
    if args.abstract_socket:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind("\0" + args.abstract_socket)
        sockets.append(unix)
    uvicorn.Server(config).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())

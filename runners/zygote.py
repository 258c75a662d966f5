"""The ``fork`` launcher: a zygote process that forks runners with everything imported.

A fresh ``python -m runners.serve`` spends seconds importing MLflow, pandas and
scikit-learn before it looks at its model. The zygote pays that once per gateway: it
imports the lot, then forks one child per runner. A child starts with every module in
place (pages shared copy-on-write with the zygote) and only downloads, loads and serves
its model, through the very same ``runners.serve.main`` as the ``direct`` launcher.

Protocol: a ``SOCK_SEQPACKET`` socket pair, the zygote's stdin; one JSON object a message.

    gateway → zygote  {"op": "spawn", "id": N, "options": {...}, "env": {...}}, carrying
                      (SCM_RIGHTS) the write end of a pipe: the child's stdout and stderr
    zygote → gateway  {"event": "ready", "pid": P, "seconds": S, ...}  once, after the imports
                      {"id": N, "pid": P}  or  {"id": N, "error": "..."}
                      {"event": "exit", "pid": P, "returncode": R}    R < 0: killed by -R

Lifetimes: the gateway's death kills the zygote (PR_SET_PDEATHSIG, set by ``spawn``), and
the zygote's death kills every child (PR_SET_PDEATHSIG, set after the fork). When the
gateway closes its end, the zygote stops its children (SIGTERM, then SIGKILL) and exits.
The gateway cannot ``waitpid`` a forked runner: the zygote reaps it and reports its exit.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

from . import flavours as flavours_module
from .errors import RunnerStartError
from .process import die_with_parent, kill_group
from .serve import ServeOptions, set_title

log = logging.getLogger("model_gateway.zygote")

# -c rather than -m: once runners/__init__ imports this module, `-m runners.zygote` would
# run it a second time as __main__ (and runpy warns about exactly that).
ZYGOTE_ARGV = [sys.executable, "-c", "import sys, runners.zygote as z; sys.exit(z.main())"]
SERVE_MODULE = "runners.serve"
PRELOAD_ENV = "MODEL_GATEWAY_ZYGOTE_PRELOAD"  # extra modules to import, comma-separated
MODELS_ENV = "MODEL_GATEWAY_ZYGOTE_MODELS"  # JSON list: the URIs whose flavours to import
MAX_MESSAGE = 1 << 20
OUTPUT_LINES = 50

# What a runner imports on its way to serving a scikit-learn model from a registry:
# runners.serve, the sqlite and HTTP stores behind models:/ URIs, the sklearn flavour (its
# default skops format pulls in most of sklearn) and uvicorn's lazily imported parts.
WARM_MODULES = (
    "mlflow", "mlflow.artifacts", "mlflow.pyfunc", "mlflow.pyfunc.scoring_server",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.tracking.rest_store", "mlflow.store.model_registry.rest_store",
    "mlflow.store.artifact.models_artifact_repo", "mlflow.store.artifact.local_artifact_repo",
    "pandas", "sklearn", "sklearn.linear_model", "mlflow.sklearn", "skops.io",
    "fastapi", "uvicorn", "uvicorn.loops.auto", "uvicorn.loops.uvloop",
    "uvicorn.protocols.http.auto", "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.auto", "uvicorn.lifespan.on", SERVE_MODULE,
)


class ZygoteError(RunnerStartError):
    """The zygote could not start, refused a fork, or is gone."""


# == the zygote process ===================================================================

def main() -> int:
    began = time.monotonic()
    control = _take_control_socket()
    set_title("model-gateway zygote")
    flavours = _warm_up()
    # Objects alive now are never collected: keep the child's GC from writing to (and so
    # copying) the pages they live on.
    gc.collect()
    gc.freeze()
    _send(control, {"event": "ready", "pid": os.getpid(),
                    "seconds": round(time.monotonic() - began, 3), "modules": len(sys.modules),
                    "flavour_modules": flavours})
    return _Server(control).run()


def _take_control_socket() -> socket.socket:
    try:
        control = socket.socket(fileno=os.dup(0))
    except OSError as exc:
        raise SystemExit(f"runners.zygote: stdin must be the gateway's socket ({exc})") from exc
    if control.type != socket.SOCK_SEQPACKET:
        raise SystemExit("runners.zygote: stdin must be a SOCK_SEQPACKET socket")
    # Children inherit fd 0: give them /dev/null, never the protocol socket.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return control


def _warm_up() -> list[str]:
    """Import what runners need; the modules imported for the models' flavours."""
    extra = [m.strip() for m in os.environ.get(PRELOAD_ENV, "").split(",") if m.strip()]
    for name in (*WARM_MODULES, *extra):
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional part (uvloop, skops) is not installed
            print(f"zygote: not preloading {name}: {exc}", flush=True)
    try:
        uris = [u for u in json.loads(os.environ.get(MODELS_ENV) or "[]") if isinstance(u, str)]
    except ValueError:
        uris = []
    flavours = flavours_module.discover(uris)
    for name in flavours:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the probe imported it; be safe anyway
            print(f"zygote: not preloading {name}: {exc}", flush=True)
    # load_model() compares the model's requirements with the installed packages; the
    # first comparison scans every installed distribution (about 0.4 s). Do it once here.
    try:
        from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches
    except ImportError:  # an MLflow internal: a later version may move it
        return flavours
    warn_dependency_requirement_mismatches(["mlflow"])
    return flavours


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    control.sendall(json.dumps(message).encode())


def check_single_threaded() -> None:
    """Refuse to fork beside other Python threads: a lock one of them holds stays locked
    forever in the child. (Native BLAS and jemalloc threads register fork handlers.)"""
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        raise ZygoteError(f"zygote refuses to fork: {threading.active_count()} Python threads "
                          f"are running ({names}); something it imported started them")


class _Server:
    """The zygote's single-threaded loop: requests in, forks, reaps, exit reports out."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: set[int] = set()
        # SIGCHLD only writes a byte to this pipe (set_wakeup_fd); the loop does the reaping.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        try:
            while True:
                for fd, _ in poller.poll(5000):  # the timeout only backs up SIGCHLD
                    if fd == self.wake_r:
                        os.read(self.wake_r, 4096)
                    elif not self._receive():
                        return 0
                self._reap()
        except (BrokenPipeError, ConnectionResetError):  # the gateway is gone
            return 0
        finally:
            self._stop_children(grace=2.0)

    def _receive(self) -> bool:
        """Handle one request; False when the gateway closed its end."""
        data, fds, flags, _ = socket.recv_fds(self.control, MAX_MESSAGE, 4)
        if not data and not fds:
            return False
        request: Any = None
        try:
            request = json.loads(data)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1:
                raise ValueError("a spawn request is one message carrying one file descriptor")
            options = ServeOptions(**request["options"])
            pid = self._fork(options, dict(request["env"]), fds[0])
            reply: dict[str, Any] = {"id": request.get("id"), "pid": pid}
        except (ValueError, KeyError, TypeError, OSError, ZygoteError) as exc:
            reply = {"id": request.get("id") if isinstance(request, dict) else None,
                     "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:  # the child has its copy; later children must not inherit it
                os.close(fd)
        _send(self.control, reply)
        return True

    def _fork(self, options: ServeOptions, env: dict[str, str], output: int) -> int:
        check_single_threaded()
        sys.stdout.flush()  # or the child would write the zygote's buffered output again
        sys.stderr.flush()
        gc.freeze()
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(options, env, output, [self.control.fileno(), self.wake_r, self.wake_w],
                   zygote)
        self.children.add(pid)
        return pid

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._report_exit(pid, os.waitstatus_to_exitcode(status))

    def _report_exit(self, pid: int, returncode: int) -> None:
        try:
            _send(self.control, {"event": "exit", "pid": pid, "returncode": returncode})
        except OSError:
            pass  # the gateway is gone; nobody is left to tell

    def _stop_children(self, grace: float) -> None:
        """SIGTERM every child's group, reap for ``grace`` seconds, SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.children:
                kill_group(pid, sig)
            deadline = time.monotonic() + grace
            while self.children and time.monotonic() < deadline:
                time.sleep(0.05)
                self._reap()


def _child(options: ServeOptions, env: dict[str, str], output: int, inherited: list[int],
           zygote: int) -> NoReturn:
    """The forked runner: serves ``options`` as ``runners.serve.run`` and never returns."""
    code = 1
    try:
        os.setsid()  # its own process group, stopped with killpg like any runner
        die_with_parent(zygote)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        os.environ.clear()
        os.environ.update(env)
        if (numpy := sys.modules.get("numpy")) is not None:
            numpy.random.seed()  # `random` reseeds itself after a fork; numpy does not
        serve = sys.modules[SERVE_MODULE]
        sys.argv = [str(serve.__file__), *options.argv()]
        code = _exit_code(serve.run, options)
    except BaseException:  # noqa: BLE001 - nothing may unwind into the zygote's loop
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a normal interpreter exit would run
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _exit_code(entry: Any, options: ServeOptions) -> int:
    """Run ``entry(options)`` and map its outcome to an exit status as the interpreter does."""
    try:
        result = entry(options)
    except SystemExit as exc:
        result = exc.code
    except BaseException:  # noqa: BLE001 - printed like an uncaught exception, status 1
        traceback.print_exc()
        return 1
    if result is None or isinstance(result, int):
        return result or 0
    print(result, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

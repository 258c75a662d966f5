"""What the zygote imports for the declared models: their flavours, read from ``MLmodel``.

The zygote's fixed list makes scikit-learn models start in a quarter of a second; an
xgboost or LightGBM model would still pay for importing its library in every forked
runner. So the zygote also imports, once, what each declared model's flavours need:
``mlflow.<flavour>``, the library (``lightgbm``, ``xgboost``, ``torch`` …), the module of
its ``model_class`` and its pyfunc ``loader_module``.

Finding them asks the registry, and the zygote must stay free of open connections and
threads (its children inherit both): a forked probe reads the ``MLmodel`` files, imports
each candidate module, keeps those that start no thread on import (a runner cannot be
forked from a process with threads), and reports the list on a pipe. The zygote then
imports exactly those.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time
import traceback
from typing import Any

# Flavours whose library is not named after them.
LIBRARIES = {"pytorch": "torch", "onnx": "onnxruntime", "spark": "pyspark",
             "tensorflow": "tensorflow", "keras": "keras", "paddle": "paddle",
             "sentence_transformers": "sentence_transformers"}
PROBE_TIMEOUT = 60.0


def modules_for(mlmodel: dict[str, Any]) -> list[str]:
    """The modules loading a model with this ``MLmodel`` imports, in import order."""
    found: list[str] = []
    flavors = mlmodel.get("flavors")
    if not isinstance(flavors, dict):
        return found
    for name, conf in flavors.items():
        if not isinstance(name, str) or not name.isidentifier():
            continue
        if name != "python_function":
            found += [f"mlflow.{name}", LIBRARIES.get(name, name)]
        conf = conf if isinstance(conf, dict) else {}
        model_class = conf.get("model_class")
        if isinstance(model_class, str) and "." in model_class:
            found.append(model_class.rsplit(".", 1)[0])
        loader = conf.get("loader_module")
        if name == "python_function" and isinstance(loader, str):
            found.append(loader)
    return list(dict.fromkeys(m for m in found if all(p.isidentifier() for p in m.split("."))))


def discover(uris: list[str], timeout: float = PROBE_TIMEOUT) -> list[str]:
    """The modules the models at ``uris`` need that are safe to import before a fork,
    found by a forked probe; [] when the probe fails (the zygote just imports less)."""
    if not uris:
        return []
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the probe
        os.close(read_end)
        code = 1
        try:
            os.write(write_end, json.dumps(_probe(uris)).encode())
            code = 0
        except BaseException:  # noqa: BLE001 - nothing may unwind into the zygote
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    try:
        data = _read_all(read_end, time.monotonic() + timeout)
    finally:
        os.close(read_end)
        _reap(pid)
    try:
        modules = json.loads(data) if data else []
    except ValueError:
        return []
    return [m for m in modules if isinstance(m, str)]


def _probe(uris: list[str]) -> list[str]:
    import importlib

    import mlflow.artifacts
    import yaml

    wanted: list[str] = []
    for uri in uris:
        try:
            path = mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/MLmodel")
            with open(path, encoding="utf-8") as fh:
                wanted += modules_for(yaml.safe_load(fh) or {})
        except Exception as exc:  # noqa: BLE001 - a model that cannot be read starts slower
            print(f"zygote: cannot read the flavours of {uri}: {exc}", flush=True)
    safe = []
    for name in dict.fromkeys(wanted):
        if name in sys.modules:
            continue
        threads = threading.active_count()
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - e.g. mlflow.<flavour> without its library
            continue
        if threading.active_count() > threads:
            print(f"zygote: not preloading {name}: importing it starts a thread", flush=True)
            break  # the threads stay: later imports cannot be judged any more
        safe.append(name)
    return safe


def _read_all(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    return b""  # too slow: use nothing rather than half a list


def _reap(pid: int) -> None:
    """Collect the probe; kill it first if it is still running (it timed out)."""
    import signal

    if os.waitpid(pid, os.WNOHANG)[0] == 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)

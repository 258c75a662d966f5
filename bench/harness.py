"""Shared pieces of the benchmark sections.

- :func:`ensure_tools` installs wrk / nginx with apt-get when they are missing.
- :class:`Service` is a child process in its own process group with its output in a file;
  :class:`GatewayService` and :class:`NginxService` build on it.
- :func:`run_wrk` runs one wrk measurement and returns a :class:`WrkResult`.
- :func:`cpu_seconds`, :func:`machine_cpu_seconds` and :func:`wait_for_quiet` account CPU
  time from /proc: per process, and for the whole machine, which on a shared machine
  tells how much other work skewed a run.
- :class:`Options` holds the settings every section shares (rounds, duration, connections).

Every service is a context manager that stops its process (SIGTERM, then SIGKILL of the
group) however the block is left; :func:`exit_on_sigterm` turns SIGTERM into an
exception so those blocks run when the benchmark itself is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


# -- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    rounds: int = 3
    duration: float = 10.0
    warmup: float = 3.0
    connections: int = 16
    threads: int = 1
    quiet_wait: float = 60.0  # before a run, wait up to this long for an idle machine
    max_noise: float = 0.25  # CPUs other processes may use during a run before it is redone
    retries: int = 2  # how often a noisy run is redone


def add_options(parser: argparse.ArgumentParser) -> None:
    defaults = Options()
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="interleaved rounds per measurement (median reported)")
    parser.add_argument("--duration", type=float, default=defaults.duration,
                        help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=defaults.warmup,
                        help="seconds of unmeasured load per target before the rounds")
    parser.add_argument("--connections", type=int, default=defaults.connections)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="wrk threads")
    parser.add_argument("--quiet-wait", type=float, default=defaults.quiet_wait,
                        help="before each run, wait up to this many seconds for the machine "
                             "to be idle (0: do not wait)")
    parser.add_argument("--max-noise", type=float, default=defaults.max_noise,
                        help="a run during which other processes used more CPUs than this "
                             "is redone")
    parser.add_argument("--retries", type=int, default=defaults.retries,
                        help="how often a noisy run is redone at most")


def options_from(args: argparse.Namespace) -> Options:
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1 or args.threads < 1:
        raise SystemExit("--rounds, --duration, --connections and --threads must be positive")
    return Options(rounds=args.rounds, duration=args.duration, warmup=max(args.warmup, 0.0),
                   connections=args.connections, threads=args.threads,
                   quiet_wait=max(args.quiet_wait, 0.0), max_noise=args.max_noise,
                   retries=max(args.retries, 0))


# -- environment --------------------------------------------------------------------------
def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit so every ``with`` block stops what it started."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_tools(packages: dict[str, str]) -> None:
    """``{binary: debian package}``: apt-get install the packages whose binary is missing."""
    missing = sorted({pkg for binary, pkg in packages.items() if find_binary(binary) is None})
    if not missing:
        return
    print(f"installing {', '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                   timeout=600)
    still = [b for b in packages if find_binary(b) is None]
    if still:
        raise RuntimeError(f"still missing after apt-get install: {', '.join(still)}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, *, method: str = "GET", body: bytes | None = None,
         content_type: str = "application/json", timeout: float = 30.0) -> tuple[int, bytes]:
    """One request with the standard library: (status, body); HTTP errors are not raised."""
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(check: Callable[[], T], timeout: float, what: str, *,
               interval: float = 0.2) -> T:
    """Call ``check()`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            result = check()
            if result:
                return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


# -- CPU accounting -----------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from "state" on; comm may hold spaces


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time used so far by ``pids`` (their own threads, not children)."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def machine_cpu_seconds() -> float:
    """CPU time every process on the machine has used so far (all CPUs, idle excluded)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_for_quiet(max_wait: float, *, threshold: float = 0.25, window: float = 1.0) -> float:
    """Wait (up to ``max_wait`` s) for a ``window`` in which the whole machine used less
    than ``threshold`` CPUs: on a shared machine, other work skews every figure. Returns
    the load seen last."""
    deadline = time.monotonic() + max_wait
    load, waited = 0.0, False
    while True:
        before = machine_cpu_seconds()
        time.sleep(window)
        load = (machine_cpu_seconds() - before) / window
        if load < threshold or time.monotonic() >= deadline:
            break
        if not waited:
            print(f"  waiting for the machine to quieten ({load:.2f} CPUs busy)",
                  file=sys.stderr, flush=True)
            waited = True
    return load


def pin(pids: Sequence[int], cpus: set[int]) -> None:
    """Restrict every thread of ``pids`` to ``cpus`` (threads they start later inherit it)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(int(task.name), cpus)


def children_cpu_seconds() -> float:
    """CPU time of this process's children that have been waited for (wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- child processes ----------------------------------------------------------------------
class Service:
    """A child process in its own process group, its output going to ``log_path``."""

    name = "service"

    def __init__(self, argv: Sequence[str], log_path: Path, *, cwd: Path = ROOT,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; "
                               f"last output:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process, wait up to ``grace``, then SIGKILL its whole group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop within {grace:.0f}s; killing it",
                      file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class GatewayService(Service):
    """``model-gateway serve`` on a free port; remembers runner pids to reap any leftover."""

    name = "gateway"

    def __init__(self, config: Path, log_path: Path, *, log_level: str = "INFO",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        # `python -m gateway` from ROOT with ROOT first on the path: the gateway of this
        # tree, even when another copy of the project is installed in the venv.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        super().__init__([sys.executable, "-m", "gateway", "serve", "--config", str(config),
                          "--port", str(self.port), "--log-level", log_level], log_path,
                         env={**os.environ, "PYTHONPATH": path, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner_pids: set[int] = set()

    def start(self) -> None:
        super().start()
        try:
            wait_until(self._ready, 120, "gateway /readyz")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        self.check_alive()
        return http(f"{self.url}/readyz", timeout=2)[0] == 200

    def status(self, name: str, alias: str) -> dict[str, Any]:
        """The endpoint's status from the admin API (runner details included); the config
        must have bench.probes.ADMIN_TOKEN (write_config adds it)."""
        from bench.probes import ADMIN_TOKEN

        request = urllib.request.Request(f"{self.url}/admin/endpoints",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            listing = json.loads(resp.read())
        status: dict[str, Any] = next(e for e in listing["endpoints"]
                                      if (e["name"], e["alias"]) == (name, alias))
        if status.get("runner"):
            self.runner_pids.add(int(status["runner"]["pid"]))
        return status

    def runner(self, name: str, alias: str) -> dict[str, Any]:
        """The runner serving ``name@alias`` (pid, port, unix_socket); it must be started."""
        runner = self.status(name, alias).get("runner")
        if not runner:
            raise RuntimeError(f"{name}/{alias} has no runner; send it a request first")
        return dict(runner)

    def stop(self, grace: float = 30.0) -> None:
        super().stop(grace)
        for pid in self.runner_pids:  # the gateway stops its runners; make sure of it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                print(f"killed leftover runner group {pid}", file=sys.stderr)


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream runner {{
        server 127.0.0.1:{upstream};
        keepalive {keepalive};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://runner;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


class NginxService(Service):
    """nginx, one worker, reverse proxy with a keep-alive upstream, config in ``prefix``."""

    name = "nginx"

    def __init__(self, upstream_port: int, prefix: Path, *, keepalive: int = 64) -> None:
        binary = find_binary("nginx")
        if binary is None:
            raise RuntimeError("nginx is not installed")
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, upstream=upstream_port,
                                          keepalive=keepalive, port=self.port))
        super().__init__([binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix /
                          "error.log")], prefix / "nginx.out")
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        try:
            wait_until(self._listening, 10, "nginx listening")
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        self.check_alive()
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self, grace: float = 10.0) -> None:
        super().stop(grace)  # SIGTERM is nginx's fast shutdown


# -- wrk ----------------------------------------------------------------------------------
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT {\\"requests\\": %d, \\"duration_us\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d, \\"connect\\": %d, \\"read\\": %d, "
    .. "\\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True)
class Load:
    """What wrk sends: a method, and for POST a body with its content type."""

    method: str = "GET"
    body: bytes | None = None
    content_type: str = "application/json"

    def lua(self) -> str:
        lines = [f'wrk.method = "{self.method}"']
        if self.body is not None:
            text = self.body.decode()
            if "]==]" in text:
                raise ValueError("the body must not contain ']==]'")
            lines += [f"wrk.body = [==[{text}]==]",
                      f'wrk.headers["Content-Type"] = "{self.content_type}"']
        return "\n".join(lines) + "\n" + WRK_DONE


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and timeouts
    bad_status: int  # answers other than 2xx / 3xx

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_json(script: Path, url: str, *, marker: str, duration: float, connections: int,
             threads: int = 1, timeout: str = "10s") -> dict[str, Any]:
    """Run wrk with ``script``, whose ``done`` prints ``<marker> {json}``; that JSON."""
    binary = find_binary("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed")
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            "--timeout", timeout, "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120,
                          check=False)
    prefix = f"{marker} "
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(prefix)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]}"
                           f"{done.stderr[-500:]}")
    result: dict[str, Any] = json.loads(line.removeprefix(prefix))
    return result


def run_wrk(url: str, load: Load, *, duration: float, connections: int, threads: int,
            script_dir: Path) -> WrkResult:
    """One wrk run of ``load``, its figures from the JSON line the script's ``done`` prints."""
    lua = load.lua()
    script = script_dir / f"wrk-{hashlib.sha1(lua.encode()).hexdigest()[:12]}.lua"
    if not script.exists():
        script.write_text(lua)
    raw = wrk_json(script, url, marker="WRK_RESULT", duration=duration,
                   connections=connections, threads=threads)
    return WrkResult(requests=raw["requests"], seconds=raw["duration_us"] / 1e6,
                     p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
                     errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
                     bad_status=raw["status"])


# -- reporting ----------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save_result(section: str, text: str) -> Path:
    """Keep a copy under bench/results/ (ignored by git), named by section and time."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{section}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(text + "\n")
    return path


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Print what is going on (to stderr), with its duration when it is done."""
    print(f"· {what} …", file=sys.stderr, flush=True)
    started = time.monotonic()
    yield
    print(f"  {what}: {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)

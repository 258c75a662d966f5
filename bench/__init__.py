"""Benchmarks of the gateway, one module per section; ``python bench/run.py`` runs them all.

- ``harness``: shared pieces (free ports, the gateway and nginx as child processes, wrk).
- ``proxy``: throughput and latency of the proxy against the runner itself and nginx.
"""

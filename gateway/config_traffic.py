"""The config keys that shape an endpoint's traffic rather than its runner: batching,
shadow, the inference log, rollouts, and the checks that routing endpoints (``traffic``)
and shadows name declared endpoints that serve a model."""

from __future__ import annotations

import itertools
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator, model_validator

from runners import RolloutSpec

from .config_types import Duration, Size, Strict
from .splits import arm_key, check_weights


def off_when_false(value: Any) -> Any:
    return {"enabled": False} if value is False else value


class BatchingConfig(Strict):
    """Merge concurrent prediction requests into one predict call (``gateway.batching``)."""

    enabled: bool = True  # `batching: false` on an endpoint: off, whatever defaults say
    max_batch_size: int = Field(64, ge=1, le=4096)  # requests in one predict call
    # 0: opportunistic (only requests that queue while the runner is busy are merged);
    # > 0: the first request of a batch waits at most this long for companions.
    max_wait: Duration = Field(0.0, le=1.0)


def _percent(value: Any) -> Any:
    if isinstance(value, str) and value.strip().endswith("%"):
        return value.strip()[:-1]
    return value


class ShadowConfig(Strict):
    """Copies of a share of the predictions go to another endpoint (``gateway.shadow``)."""

    to: str = Field(min_length=1)  # an alias of this name, or name/alias
    percent: Annotated[float, BeforeValidator(_percent)] = Field(100.0, ge=0, le=100)
    tolerance: float = Field(1e-6, ge=0)  # numbers agree within it, relative or absolute


Percent = Annotated[float, BeforeValidator(_percent)]


class RolloutConfig(Strict):
    """A new version takes traffic step by step and is rolled back when it does worse
    than the old one (``runners.rollout``)."""

    enabled: bool = True  # `rollout: false` on an endpoint: immediate cutovers
    steps: list[Percent] = Field(default_factory=lambda: [10.0, 50.0, 100.0], min_length=1)
    step_time: Duration = Field(120.0, gt=0)  # at each step, at least
    max_error_rate: Percent = Field(1.0, ge=0, le=100)  # percent of its requests: 5xx,
    #                                                   unreachable or timed out
    max_latency_ratio: float = Field(2.0, ge=1.0)  # its p95 over the old version's
    min_requests: int = Field(50, ge=1)  # per step, before it is judged or passed
    sticky: str | None = Field(None, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # a header

    @field_validator("steps")
    @classmethod
    def _ascending(cls, steps: list[float]) -> list[float]:
        if any(not 0 < step <= 100 for step in steps):
            raise ValueError("each step is a percent of traffic: more than 0, at most 100")
        if any(a >= b for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must go up, such as [10, 50, 100]")
        return steps

    def spec(self) -> RolloutSpec | None:
        if not self.enabled:
            return None
        return RolloutSpec(tuple(self.steps), self.step_time, self.max_error_rate / 100,
                           self.max_latency_ratio, self.min_requests, self.sticky)


class InferenceLogConfig(Strict):
    """One JSON line per sampled prediction (``gateway.inference_log``)."""

    enabled: bool = True  # `inference_log: false` on an endpoint: off despite defaults
    path: str | None = Field(None, min_length=1)  # required when enabled
    sample: Annotated[float, BeforeValidator(_percent)] = Field(100.0, ge=0, le=100)
    max_body: Size = Field(16 * 1024, ge=0)  # larger bodies are logged as their size
    max_file_size: Size = Field(100 * 2**20, ge=4096)  # then rotated: path.1, path.2 …
    keep: int = Field(5, ge=0)  # rotated files kept


    @model_validator(mode="after")
    def _has_a_path(self) -> InferenceLogConfig:
        if self.enabled and not self.path:
            raise ValueError("path is required")
        return self


# What only an endpoint with a runner can have; a routing endpoint's arms set it.
ROUTING_ONLY = {"name", "alias", "traffic", "sticky", "public", "api_keys", "default"}


def routing_errors(config: Any) -> list[str]:
    """Routing endpoints name declared endpoints that serve a model, with usable weights."""
    declared = {(e.name, e.alias) for e in config.endpoints if e.traffic is None}
    routing = {(e.name, e.alias) for e in config.endpoints if e.traffic is not None}
    errors = []
    files: dict[str, tuple[int, int, str]] = {}
    for i, ep in enumerate(config.endpoints):
        where = f"endpoints[{i}]"
        logs = config.defaults.inference_log if ep.inference_log is None else \
            ep.inference_log
        if logs and logs.enabled and logs.path:
            first = files.setdefault(logs.path, (logs.max_file_size, logs.keep, where))
            if first[:2] != (logs.max_file_size, logs.keep):
                errors.append(f"{where}.inference_log: {logs.path} is also written by "
                              f"{first[2]} with another max_file_size or keep")
        if ep.traffic is None:
            if ep.sticky is not None:
                errors.append(f"{where}.sticky: only a routing endpoint (with traffic) is "
                              "sticky")
            if ep.shadow is not None:
                target = arm_key(ep.name, ep.shadow.to)
                if target == (ep.name, ep.alias):
                    errors.append(f"{where}.shadow.to: an endpoint cannot shadow itself")
                elif target in routing:
                    errors.append(f"{where}.shadow.to: {target[0]}/{target[1]} routes "
                                  "traffic; a shadow must serve a model")
                elif target not in declared:
                    errors.append(f"{where}.shadow.to: no endpoint {target[0]}/{target[1]} "
                                  "is declared")
            continue
        for key in sorted(ep.model_fields_set - ROUTING_ONLY):
            what = "has no model of its own" if key == "model_uri" else \
                "has no runner; set it on its arms"
            errors.append(f"{where}.{key}: a routing endpoint (traffic) {what}")
        for arm, message in check_weights((ep.name, ep.alias), ep.traffic, declared, routing):
            errors.append(f"{where}.traffic{'.' + arm if arm is not None else ''}: {message}")
    return errors

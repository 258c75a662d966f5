"""The Helm chart in deploy/helm/mlflow-model-gateway: linted, rendered and validated.

No cluster and no network. ``helm`` (scripts/install puts a static helm 4 in .venv/bin when
none is on PATH) lints the chart and renders it with its default values and with
``ci/full-values.yaml``; every manifest is validated with kubernetes-validate (strict) for
K8S_VERSION, the rendered gateway.yaml passes ``model-gateway check-config``, the schema
refuses wrong values by name, and the chart renders the same kinds of objects as the
Kustomize base.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor

from tests.test_deploy import KUBECTL, dockerfile_stages, image_env, parse_bytes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHART = ROOT / "deploy" / "helm" / "mlflow-model-gateway"
FULL = CHART / "ci" / "full-values.yaml"
KUBE = ROOT / "deploy" / "kubernetes"
# A supported Kubernetes release: the one helm 4.1 renders for by default
# (Capabilities.KubeVersion), validated with the installed kubernetes-validate's schemas.
K8S_VERSION = "1.35.0"
RELEASE, NAMESPACE = "gw", "models"
FULLNAME = f"{RELEASE}-mlflow-model-gateway"  # default values: <release>-<chart>
SERVICE_MONITOR = "monitoring.coreos.com/v1/ServiceMonitor"
MIB = 2**20

Docs = tuple[dict[str, Any], ...]
IMAGE_CONFIG = image_env(dockerfile_stages()[-1], {})["MODEL_GATEWAY_CONFIG"]


@cache
def helm() -> str:
    """helm from this venv (scripts/install), else from PATH; missing fails, never skips."""
    local = BIN / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if found is None:
        pytest.fail("helm is not installed: run scripts/install (it puts helm in .venv/bin)")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)


def sets(**values: Any) -> tuple[str, ...]:
    """``--set-json`` arguments, typed as given: sets(replicaCount=2, **{"a.b": "x"})."""
    return tuple(f"--set-json={key}={json.dumps(value)}" for key, value in values.items())


@cache
def render_result(*args: str) -> subprocess.CompletedProcess[str]:
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--kube-version", K8S_VERSION, *args)


def render(*args: str) -> Docs:
    proc = render_result(*args)
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render_error(*args: str) -> str:
    proc = render_result(*args)
    assert proc.returncode != 0, f"helm template {' '.join(args)} rendered:\n{proc.stdout}"
    return proc.stderr


DEFAULT: tuple[str, ...] = ()
FULL_ARGS = ("--values", str(FULL), "--api-versions", SERVICE_MONITOR)
VARIANTS = {"default": DEFAULT, "full": FULL_ARGS}


def kinds(docs: Docs) -> list[str]:
    return sorted(d["kind"] for d in docs)


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def maybe(docs: Docs, kind: str) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) <= 1, f"more than one {kind}"
    return found[0] if found else None


def pod_spec(docs: Docs) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: Docs) -> dict[str, Any]:
    (gateway,) = pod_spec(docs)["containers"]
    return gateway


def gateway_yaml(docs: Docs) -> str:
    """The gateway.yaml of the ConfigMap the Deployment mounts at MODEL_GATEWAY_CONFIG."""
    pod, gateway = pod_spec(docs), container(docs)
    env = {e["name"]: e["value"] for e in gateway.get("env", []) if "value" in e}
    config_path = Path(env.get("MODEL_GATEWAY_CONFIG") or IMAGE_CONFIG)
    mount = next(m for m in gateway["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return one(docs, "ConfigMap", volume["configMap"]["name"])["data"][config_path.name]


def memory(docs: Docs) -> tuple[str | None, str | None]:
    resources = container(docs)["resources"]
    return ((resources.get("limits") or {}).get("memory"),
            (resources.get("requests") or {}).get("memory"))


def checksum(docs: Docs, name: str = "checksum/config") -> str:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"][name]


def values_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- the chart itself ---------------------------------------------------------------------
def test_chart_files_and_versions() -> None:
    for name in ["Chart.yaml", "values.yaml", "values.schema.json", "README.md",
                 "templates/_helpers.tpl", "templates/NOTES.txt", "ci/full-values.yaml"]:
        assert (CHART / name).is_file(), name
    chart = values_file(CHART / "Chart.yaml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert chart["appVersion"] == project["version"]
    json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(variant: str) -> None:
    args = ["--values", str(FULL)] if variant == "full" else []
    proc = run_helm("lint", "--strict", str(CHART), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_the_values_table_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    for key in values_file(CHART / "values.yaml"):
        assert re.search(rf"`(\w+\.)?{key}\b", table), f"{key} is not in the README's table"


# -- rendered manifests -------------------------------------------------------------------
def test_kubernetes_validate_has_schemas_for_the_version() -> None:
    versions = all_versions()
    assert major_minor(K8S_VERSION) in {major_minor(v) for v in versions}, \
        f"kubernetes-validate {version('kubernetes-validate')} knows only {versions}: " \
        f"install a newer one (pip install -U kubernetes-validate)"


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_pass_kubernetes_validate_strict(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    expected = ["ConfigMap", "Deployment", "Service", "Service", "ServiceAccount"]
    if variant == "full":  # existingSecret: no Secret of the chart's own; a dashboard
        expected += ["ConfigMap", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
                     "ServiceMonitor"]
    assert kinds(docs) == sorted(expected)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: kubernetes-validate has no schema; checked in its own test
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} "
                        f"at {'.'.join(map(str, exc.path))}")
        assert doc["metadata"]["namespace"] == NAMESPACE or doc["kind"] == "ServiceMonitor"


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_gateway_config_passes_check_config(variant: str, tmp_path: Path) -> None:
    docs = render(*VARIANTS[variant])
    values = values_file(FULL) if variant == "full" else {}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_GATEWAY_"))}
    # The container's env: plain values as they are, a Secret's key as a stand-in value.
    env = {e["name"]: e.get("value", f"<{e['name']} from a Secret>")
           for e in container(docs)["env"]}
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(docs), encoding="utf-8")
    proc = subprocess.run([str(BIN / "model-gateway"), "check-config", str(config)],
                          env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["server"] == {"host": "0.0.0.0", "port": 8080, "url_prefix": ""}
    config_values = values.get("config") or values_file(CHART / "values.yaml")["config"]
    assert [(e["name"], e["alias"]) for e in shown["endpoints"]] == \
        [(e["name"], e["alias"]) for e in config_values["endpoints"]]
    assert shown["pool"]["memory_limit"] == parse_bytes(config_values["pool"]["memory_limit"])
    parsed = yaml.safe_load(gateway_yaml(docs))
    assert parsed["tracking_uri"] == "${MLFLOW_TRACKING_URI}"
    assert parsed["auth"]["admin_tokens"][0] == "${MODEL_GATEWAY_ADMIN_TOKEN:-}"
    assert parsed["webhook_secret"] == "${MLFLOW_WEBHOOK_SECRET:-}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_deployment_is_locked_down_and_matches_the_image(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    pod, gateway = pod_spec(docs), container(docs)
    final = dockerfile_stages()[-1]
    pod_security, security = pod["securityContext"], gateway["securityContext"]
    assert pod_security["runAsNonRoot"] is security["runAsNonRoot"] is True
    assert str(pod_security["runAsUser"]) == final.last("USER").split(":")[0]
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    account = one(docs, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False

    # Every directory the image writes to is a writable emptyDir.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [Path(m["mountPath"]) for m in gateway["volumeMounts"] if m["name"] in empty_dirs]
    image = image_env(final, {})
    for key in ["HOME", "XDG_CACHE_HOME", "MLFLOW_ENV_ROOT", "UV_CACHE_DIR", "TMPDIR"]:
        path = Path(image.get(key, "/tmp"))
        assert any(path == w or w in path.parents for w in writable), f"{key}={path}"

    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["MODEL_GATEWAY_CONFIG"] == IMAGE_CONFIG

    # Probes on the container's port `http`, the one both Services forward to.
    (port,) = gateway["ports"]
    assert port == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    for probe, route in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                         ("readinessProbe", "/readyz")]:
        assert gateway[probe]["httpGet"] == {"path": route, "port": "http"}, probe

    # The kubelet waits longer than the longest drain plus the preStop pause.
    config = yaml.safe_load(gateway_yaml(docs))
    drains = [config["defaults"]["drain_timeout"],
              *(e["drain_timeout"] for e in config["endpoints"] if "drain_timeout" in e)]
    pause = int(gateway["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > max(map(seconds, drains)) + pause


def seconds(value: Any) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", str(value).strip())
    assert match, value
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match[2]]


def test_full_values_reach_the_pod() -> None:
    docs = render(*FULL_ARGS)
    values = values_file(FULL)
    deployment = one(docs, "Deployment", "model-gateway")
    pod, gateway = pod_spec(docs), container(docs)
    assert gateway["image"] == "registry.example.com/team-registry/model-gateway:0.1.0"
    assert gateway["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    for key in ["nodeSelector", "tolerations", "affinity", "priorityClassName"]:
        assert pod[key] == values[key], key
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["cost-center"] == "ml" and labels["team"] == "team-registry"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "true"
    # A spread constraint without a labelSelector selects this release's pods.
    selector = deployment["spec"]["selector"]["matchLabels"]
    zones = pod["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in zones] == ["kubernetes.io/hostname",
                                                 "topology.kubernetes.io/zone"]
    assert all(c["labelSelector"]["matchLabels"] == selector for c in zones)
    env = {e["name"]: e for e in gateway["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == values["mlflow"]["trackingUri"]
    assert env["MLFLOW_REGISTRY_URI"]["value"] == values["mlflow"]["registryUri"]
    assert env["TEAM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "model-gateway-api-keys"
    assert gateway["envFrom"] == values["extraEnvFrom"]
    assert {"name": "ca-bundle", "mountPath": "/etc/ssl/team", "readOnly": True} \
        in gateway["volumeMounts"]
    assert {"name": "ca-bundle", "configMap": {"name": "team-ca-bundle"}} in pod["volumes"]
    sizes = {v["name"]: v["emptyDir"].get("sizeLimit") for v in pod["volumes"] if "emptyDir" in v}
    assert sizes == {"tmp": "8Gi", "cache": "20Gi", "home": "256Mi"}
    account = one(docs, "ServiceAccount", "model-gateway")
    assert pod["serviceAccountName"] == "model-gateway"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:")
    assert all(d["metadata"]["annotations"]["owner"] == "ml-platform@example.com" for d in docs)


# -- Services -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_service_for_clients_and_a_headless_one_for_peers(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    deployment = one(docs, "Deployment")
    fullname = deployment["metadata"]["name"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    client = one(docs, "Service", fullname)
    peers = one(docs, "Service", f"{fullname}-headless")
    assert client["spec"].get("clusterIP") != "None"
    port = values_file(FULL)["service"]["port"] if variant == "full" else 80
    assert client["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http",
                                        "protocol": "TCP"}]
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http",
                                       "protocol": "TCP"}]
    for service in (client, peers):
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
    # Told apart by their component label (a ServiceMonitor selects the client one).
    assert client["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    assert peers["metadata"]["labels"]["app.kubernetes.io/component"] == "peers"


# -- config checksum and memory -----------------------------------------------------------
def test_the_checksum_annotation_follows_the_config() -> None:
    before = checksum(render())
    assert re.fullmatch(r"[0-9a-f]{64}", before)
    assert checksum(render()) == before  # rendering is deterministic
    for changed in [sets(**{"config.pool.max_runners": 5}),
                    sets(**{"config.defaults.poll_interval": "1m"}),
                    sets(**{"config.endpoints": [{"name": "iris", "alias": "challenger"}]}),
                    sets(**{"config.log_format": "json"}),
                    sets(**{"mlflow.registryUri": "https://registry.example.com"})]:
        assert checksum(render(*changed)) != before, changed
    # Values outside the config leave it alone: no needless rollout.
    for unrelated in [sets(replicaCount=3), sets(**{"service.port": 8080}),
                      sets(**{"resources.limits.cpu": "2"})]:
        assert checksum(render(*unrelated)) == before, unrelated


@pytest.mark.parametrize(("values", "limit", "requested"), [
    ({}, "3584Mi", "3584Mi"),  # the default 3GiB + 512Mi, as the Kustomize base
    ({"config.pool.memory_limit": "4GiB"}, "4608Mi", "4608Mi"),
    ({"config.pool.memory_limit": "4GiB", "memoryHeadroom": "1Gi"}, "5120Mi", "5120Mi"),
    ({"config.pool.memory_limit": "6000MB"}, "6235Mi", "6235Mi"),  # rounded up to MiB
    ({"config.pool.memory_limit": 2 * 2**30}, "2560Mi", "2560Mi"),  # bytes
    ({"config.pool.memory_limit": "1.5gib"}, "2048Mi", "2048Mi"),
    ({"resources.limits.memory": "10Gi"}, "10Gi", None),  # set: used as it is
    ({"resources.requests.memory": "2Gi"}, "3584Mi", "2Gi"),
    ({"config.pool.memory_limit": 0}, None, None),  # no pool limit: no container limit
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)
def test_memory_limit_derived_from_the_pool(values: dict[str, Any], limit: str | None,
                                            requested: str | None) -> None:
    docs = render(*sets(**values))
    assert memory(docs) == (limit, requested)
    config = yaml.safe_load(gateway_yaml(docs))
    if "resources.limits.memory" not in values and config["pool"]["memory_limit"]:
        headroom = parse_bytes(values.get("memoryHeadroom", "512Mi"))
        pool = parse_bytes(str(config["pool"]["memory_limit"]).replace("gib", "GiB"))
        assert parse_bytes(limit) - (pool + headroom) in range(MIB)


def test_a_memory_limit_that_cannot_be_derived_fails_by_name() -> None:
    error = render_error(*sets(**{"config.pool.memory_limit": "${POOL_MEMORY}"}))
    assert "config.pool.memory_limit" in error and "resources.limits.memory" in error
    # An explicit container limit needs no derivation.
    docs = render(*sets(**{"config.pool.memory_limit": "${POOL_MEMORY}",
                           "resources.limits.memory": "4Gi"}))
    assert memory(docs) == ("4Gi", None)


@pytest.mark.parametrize(("values", "named"), [
    ({"config.defaults.drain_timeout": "2m"}, "config.defaults.drain_timeout (2m)"),
    ({"config.endpoints": [{"name": "a", "alias": "b", "drain_timeout": 58}]},
     "config.endpoints[0].drain_timeout (58)"),
    ({"terminationGracePeriodSeconds": 30}, "config.defaults.drain_timeout (30s)"),
])
def test_grace_period_must_outlast_the_drain(values: dict[str, Any], named: str) -> None:
    error = render_error(*sets(**values))
    assert "terminationGracePeriodSeconds" in error and named in error, error


# -- the schema ---------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "path"), [
    ({"replicaCount": "three"}, "/replicaCount': got string, want integer"),
    ({"config.pool.max_runners": "many"}, "/config/pool/max_runners': got string, want integer"),
    ({"config.pool.max_runners": 0}, "/config/pool/max_runners': minimum"),
    ({"config.pool.idle_timeout": True}, "/config/pool/idle_timeout': got boolean"),
    ({"config.defaults.launcher": "spawn"}, "/config/defaults/launcher'"),
    ({"config.endpoints": [{"name": "iris", "alias": "x", "preload": "yes"}]},
     "/config/endpoints/0/preload': got string, want boolean"),
    ({"config.endpoints": [{"name": "iris"}]}, "/config/endpoints/0': missing property 'alias'"),
    ({"config.endpoints": [{"name": "a/b", "alias": "x"}]}, "/config/endpoints/0/name'"),
    ({"config.server": {"port": 9000}}, "/config/server'"),  # the chart sets it
    ({"autoscaling.enabled": "yes"}, "/autoscaling/enabled': got string, want boolean"),
    ({"image.pullPolicy": "Sometimes"}, "/image/pullPolicy'"),
    ({"memoryHeadroom": "512MB"}, "/memoryHeadroom'"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_schema_refuses_a_wrong_value_by_name(values: dict[str, Any], path: str) -> None:
    error = render_error(*sets(**values))
    assert "don't meet the specifications of the schema" in error, error
    assert path in error, error


def test_a_values_file_with_wrong_types_fails_install_and_lint(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("replicaCount: three\nconfig:\n  pool:\n    max_runners: many\n",
                     encoding="utf-8")
    for proc in [run_helm("install", RELEASE, str(CHART), "--dry-run=client", "-f", str(wrong)),
                 run_helm("lint", "--strict", str(CHART), "-f", str(wrong))]:
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output
        assert "at '/replicaCount': got string, want integer" in output
        assert "at '/config/pool/max_runners': got string, want integer" in output


def test_unknown_gateway_keys_pass_through() -> None:
    """Keys the chart does not know (e.g. ones the gateway adds later) reach gateway.yaml."""
    args = sets(**{"config.pool.min_residency": "5m", "config.defaults.warmup": False,
                   "config.state_dir": "/var/cache/model-gateway/state",
                   "config.endpoints": [{"name": "iris", "alias": "champion", "tier": "gold"}]})
    config = yaml.safe_load(gateway_yaml(render(*args)))
    assert config["pool"]["min_residency"] == "5m"
    assert config["pool"]["max_runners"] == 4  # the chart's other defaults stay
    assert config["defaults"]["warmup"] is False
    assert config["state_dir"] == "/var/cache/model-gateway/state"
    assert config["endpoints"] == [{"name": "iris", "alias": "champion", "tier": "gold"}]


# -- secrets ------------------------------------------------------------------------------
def secret_refs(docs: Docs) -> dict[str, dict[str, Any]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(docs)["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}


SECRET_VARS = {"MLFLOW_TRACKING_TOKEN", "MODEL_GATEWAY_ADMIN_TOKEN", "MLFLOW_WEBHOOK_SECRET"}


def test_no_secret_values_no_secret() -> None:
    docs = render()
    assert maybe(docs, "Secret") is None
    assert not secret_refs(docs)


def test_an_existing_secret_is_referenced_not_created() -> None:
    docs = render(*FULL_ARGS)
    assert maybe(docs, "Secret") is None
    refs = {k: v for k, v in secret_refs(docs).items() if k in SECRET_VARS}
    assert refs == {
        "MLFLOW_TRACKING_TOKEN": {"name": "model-gateway-secrets", "key": "token",
                                  "optional": True},
        "MODEL_GATEWAY_ADMIN_TOKEN": {"name": "model-gateway-secrets", "key": "admin-token",
                                      "optional": True},
        "MLFLOW_WEBHOOK_SECRET": {"name": "model-gateway-secrets", "key": "webhook",
                                  "optional": True}}


def test_secret_values_create_a_secret_that_rolls_the_pods() -> None:
    docs = render(*sets(**{"secrets.adminToken": "s3cret", "secrets.trackingToken": "tok"}))
    secret = one(docs, "Secret", FULLNAME)
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == \
        {"MODEL_GATEWAY_ADMIN_TOKEN": "s3cret", "MLFLOW_TRACKING_TOKEN": "tok"}
    refs = secret_refs(docs)
    assert set(refs) == SECRET_VARS
    assert all(r["name"] == FULLNAME and r["optional"] is True for r in refs.values())
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    other = render(*sets(**{"secrets.adminToken": "rotated", "secrets.trackingToken": "tok"}))
    assert checksum(other, "checksum/secret") != checksum(docs, "checksum/secret")
    assert checksum(other) == checksum(docs)


def test_an_existing_secret_and_secret_values_together_fail() -> None:
    error = render_error(*sets(**{"secrets.existingSecret": "mine", "secrets.adminToken": "x"}))
    assert "secrets.existingSecret" in error


# -- availability, autoscaling, monitoring, network ---------------------------------------
@pytest.mark.parametrize(("values", "rendered"), [
    ({}, False),  # one pod: a budget would only block or be meaningless
    ({"replicaCount": 2}, True),
    ({"autoscaling.enabled": True}, True),
    ({"replicaCount": 3, "podDisruptionBudget.enabled": False}, False),
])
def test_pod_disruption_budget_when_more_than_one_pod(values: dict[str, Any],
                                                       rendered: bool) -> None:
    docs = render(*sets(**values))
    budget = maybe(docs, "PodDisruptionBudget")
    assert (budget is not None) is rendered
    if budget:
        labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_autoscaler_owns_the_replica_count() -> None:
    docs = render(*FULL_ARGS)
    deployment, hpa = one(docs, "Deployment"), one(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 8)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert one(render(), "Deployment")["spec"]["replicas"] == 1
    error = render_error(*sets(**{"autoscaling.enabled": True, "autoscaling.minReplicas": 9}))
    assert "autoscaling.minReplicas" in error


def test_service_monitor_only_when_enabled_and_the_crd_exists() -> None:
    full_without_crd = ("--values", str(FULL))
    assert maybe(render(*full_without_crd), "ServiceMonitor") is None
    assert maybe(render("--api-versions", SERVICE_MONITOR), "ServiceMonitor") is None  # off
    docs = render(*FULL_ARGS)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in docs if s["kind"] == "Service"
                and selector.items() <= s["metadata"]["labels"].items()]
    # Exactly the client Service: through the headless one too, each pod would be scraped twice.
    assert [s["metadata"]["name"] for s in selected] == ["model-gateway"]
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert set(monitor["spec"]) <= {"jobLabel", "namespaceSelector", "selector", "endpoints"}


def test_network_policy() -> None:
    assert maybe(render(), "NetworkPolicy") is None
    docs = render(*FULL_ARGS)
    policy = one(docs, "NetworkPolicy")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress["from"][0] == {"podSelector": {"matchLabels": selector}}  # the peers
    assert ingress["from"][1:] == values_file(FULL)["networkPolicy"]["ingress"]["from"]
    egress = policy["spec"]["egress"]
    assert {"port": 53, "protocol": "UDP"} in egress[0]["ports"]
    assert egress[1]["to"] == [{"podSelector": {"matchLabels": selector}}]
    assert egress[2:] == values_file(FULL)["networkPolicy"]["egress"]["rules"]
    # Egress left open: only Ingress is restricted.
    docs = render(*sets(**{"networkPolicy.enabled": True}))
    open_egress = one(docs, "NetworkPolicy")["spec"]
    assert open_egress["policyTypes"] == ["Ingress"] and "egress" not in open_egress
    assert "from" not in open_egress["ingress"][0]  # no sources given: every source


# -- the release notes --------------------------------------------------------------------
def test_notes_tell_how_to_reach_a_model_and_read_its_status() -> None:
    proc = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.partition("\nNOTES:\n")[2]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{FULLNAME} 8080:80" in notes
    assert "curl -s -X POST localhost:8080/models/iris/champion/invocations" in notes
    assert "curl -s localhost:8080/models/iris/champion\n" in notes
    assert f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local/models/" in notes
    assert "closed (403)" in notes  # no admin token configured
    proc = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--dry-run=client", "-f", str(FULL))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.partition("\nNOTES:\n")[2]
    assert "/models/scoring%20model.v2/canary" in notes
    assert "get secret model-gateway-secrets" in notes
    assert "no ServiceMonitor CRD" in notes  # enabled, but this install has no such CRD


# -- the Kustomize base -------------------------------------------------------------------
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def kustomize(tmp_path: Path, components: list[str]) -> Docs:
    """The Kustomize base, with the given components, rendered by ``kubectl kustomize``."""
    assert KUBECTL is not None
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE / "base", tmp_path)],
        "components": [os.path.relpath(KUBE / "components" / c, tmp_path) for c in components],
    }), encoding="utf-8")
    proc = subprocess.run([KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def services(docs: Docs) -> list[str]:
    return sorted("headless" if d["spec"].get("clusterIP") == "None" else "client"
                  for d in docs if d["kind"] == "Service")


@needs_kubectl
@pytest.mark.parametrize(("components", "values"), [
    # The base runs one replica with a budget of maxUnavailable 1; the chart renders a
    # budget once more than one pod can run, so it is compared at two replicas.
    ([], {"replicaCount": 2}),
    (["hpa"], {"autoscaling.enabled": True}),
], ids=["base", "base+hpa"])
def test_chart_and_kustomize_base_render_the_same_kinds(
        tmp_path: Path, components: list[str], values: dict[str, Any]) -> None:
    """Both render: ServiceAccount, ConfigMap, Deployment, PodDisruptionBudget and two
    Services, one for clients and one headless for peers (the base's model-gateway-peers,
    the chart's <fullname>-headless); with the autoscaler, a HorizontalPodAutoscaler too.
    One difference in number, not in kind: the base has a second ConfigMap
    (model-gateway-env, for MLFLOW_TRACKING_URI), which the chart sets in the container's
    env instead."""
    base, chart = kustomize(tmp_path, components), render(*sets(**values))
    expected = {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"}
    expected |= {"HorizontalPodAutoscaler"} if components else set()
    assert set(kinds(base)) == set(kinds(chart)) == expected
    assert services(base) == services(chart) == ["client", "headless"]
    assert kinds(base).count("ConfigMap") == 2 and kinds(chart).count("ConfigMap") == 1
    # And the same pod: port, probes, security, memory and grace period.
    for key in ["ports", "startupProbe", "livenessProbe", "readinessProbe", "securityContext",
                "resources", "lifecycle"]:
        assert container(base)[key] == container(chart)[key], key
    for key in ["securityContext", "terminationGracePeriodSeconds", "enableServiceLinks",
                "automountServiceAccountToken"]:
        assert pod_spec(base)[key] == pod_spec(chart)[key], key
    base_config = yaml.safe_load(gateway_yaml(base))
    chart_config = yaml.safe_load(gateway_yaml(chart))
    for key in ["server", "tracking_uri", "endpoints"]:
        assert base_config[key] == chart_config[key], key
    for key in ["pool", "defaults"]:  # the chart spells out more of the defaults
        assert base_config[key].items() <= chart_config[key].items(), key
    if components:
        base_hpa = one(base, "HorizontalPodAutoscaler")["spec"]
        chart_hpa = one(chart, "HorizontalPodAutoscaler")["spec"]
        for key in ["minReplicas", "maxReplicas", "metrics", "behavior"]:
            assert base_hpa[key] == chart_hpa[key], key

"""The platform's pod descriptor (.section-proxy.yaml) against Kubernetes' own
schemas (offline, from the kubernetes-validate wheel) and against the image
it describes: the Dockerfile and the proxy's own defaults."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy import settings

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = "1.37"

#: The load one pod is sized for (docs/deployment.md, "Resources").
PLANNED_CONNECTIONS = 4000
PLANNED_STREAMS = 200
STREAM_BUFFERS_BYTES = 2 * 64 * 1024
METRICS_PROCESS_BYTES = 32 * 1024 * 1024

_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


@pytest.fixture(scope="module")
def descriptor() -> dict[str, Any]:
    return yaml.safe_load((ROOT / ".section-proxy.yaml").read_text())


@pytest.fixture(scope="module")
def container(descriptor) -> dict[str, Any]:
    (only,) = descriptor["spec"]["containers"]
    return only


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container["env"]}


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()
    return int(number) * _UNITS[unit]


def test_pod_spec_is_valid_for_kubernetes(descriptor):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "edge-proxy"}, "spec": descriptor["spec"]}
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def test_a_wrong_field_is_caught_by_the_schema(descriptor):
    """The validation is real: a misspelt field fails it."""
    spec = json.loads(json.dumps(descriptor["spec"]))
    spec["containers"][0]["volumeMount"] = spec["containers"][0].pop("volumeMounts")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "edge-proxy"}, "spec": spec}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def test_hpa_is_a_valid_autoscaler(descriptor):
    hpa = descriptor["hpa"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    metric = hpa["metric"]
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "edge-proxy"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "edge-proxy"},
            "minReplicas": hpa["minReplicas"],
            "maxReplicas": hpa["maxReplicas"],
            "metrics": [
                {
                    "type": metric["type"],
                    "pods": {
                        "metric": {"name": metric["name"]},
                        "target": {"type": "AverageValue", "averageValue": str(metric["targetAverageValue"])},
                    },
                }
            ],
        },
    }
    kubernetes_validate.validate(autoscaler, KUBERNETES, strict=True)


def test_metadata_names_this_image(descriptor, container):
    meta = descriptor["metadata"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert meta["name"] == f"edge-proxy:{version}"
    assert meta["image"] == container["image"]
    assert meta["httpContainer"] == container["name"]
    assert meta["configurationMountPath"] == "/opt/proxy_config" == str(settings.from_environ({}).config_dir)


def test_logs_follow_the_log_target(descriptor, container):
    logs = descriptor["metadata"]["logs"]
    assert logs["handler"]
    assert logs["http"] == {"container": container["name"], "stream": "stdout"}
    assert [(entry["container"], entry["stream"]) for entry in logs["additional"]] == [(container["name"], "stderr")]
    # Access lines on stdout and diagnostics on stderr is the stdout target.
    target = _env(container).get("PROXY_LOG_TARGET") or settings.from_environ({}).log_target
    assert target == "stdout"


def test_metrics_point_at_the_metrics_endpoint(descriptor, container):
    metrics = descriptor["metadata"]["metrics"]
    assert metrics["path"] == "/metrics"
    assert str(metrics["port"]) == _env(container)["PROXY_METRICS_PORT"]


def test_port_and_command_match_the_image(container, dockerfile):
    assert [(p["containerPort"], p["protocol"]) for p in container["ports"]] == [(80, "TCP")]
    assert re.search(r"^EXPOSE 80$", dockerfile, re.M)
    assert settings.from_environ({}).port == 80
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert container["command"] == json.loads(cmd.group(1))


def test_env_is_name_and_value_only(container):
    assert all(set(entry) == {"name", "value"} for entry in container["env"])
    # One worker per CPU of the pod: the CPU limit, not the node's CPU count.
    assert int(_env(container)["WEB_CONCURRENCY"]) == int(container["resources"]["limits"]["cpu"])


def test_volumes_cover_every_directory_the_proxy_writes(descriptor, container):
    volumes = descriptor["spec"]["volumes"]
    assert all(set(volume) == {"name"} for volume in volumes), "name-only volumes (emptyDir)"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert set(mounts.values()) == {volume["name"] for volume in volumes}
    env = _env(container)
    defaults = settings.from_environ(env)
    written = {str(defaults.run_dir), env["PROXY_CACHE_DIR"]}
    if defaults.log_target == "file":
        written.add(str(defaults.log_dir))
    assert written <= set(mounts)
    assert "/opt/proxy_config" not in mounts, "the platform mounts the configuration itself"


def test_probes_set_only_their_delay(container):
    for name in ("readinessProbe", "livenessProbe"):
        probe = container[name]
        handlers = set(probe) & {"tcpSocket", "httpGet", "exec", "grpc"}
        assert len(handlers) == 1
        assert set(probe) - handlers == {"initialDelaySeconds"}
        # Never through to next-hop: an origin outage must not restart proxies.
        assert "httpGet" not in probe


def test_no_service_account(descriptor):
    spec = descriptor["spec"]
    assert not {"serviceAccount", "serviceAccountName", "automountServiceAccountToken"} & set(spec)


def test_memory_is_sized_from_the_measured_costs(container):
    """The arithmetic of docs/deployment.md, from the committed measurements."""
    scale = json.loads((ROOT / "docs" / "bench-scale.json").read_text())
    workers = int(_env(container)["WEB_CONCURRENCY"])
    per_process = scale["idle"]["baseline_rss"]
    needed = (
        (workers + 1) * per_process  # the workers and the master
        + METRICS_PROCESS_BYTES
        + PLANNED_CONNECTIONS * scale["idle"]["per_connection"]
        + PLANNED_STREAMS * STREAM_BUFFERS_BYTES
    )
    resources = container["resources"]
    request, limit = _bytes(resources["requests"]["memory"]), _bytes(resources["limits"]["memory"])
    assert needed <= request <= limit
    assert request < 2 * needed, "requested memory is sized, not guessed"

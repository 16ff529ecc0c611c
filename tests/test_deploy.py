"""The Kubernetes manifests (deploy/k8s) and docker-compose.yml as a cluster or Compose would read
them: every overlay rendered by kustomize, every object validated against the Kubernetes schemas
(and the KEDA / Prometheus Operator CRD models) offline, cross-references resolved, the
gateway's turnout.yaml loaded by turnout itself, yamllint clean."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
from prometheus_client import generate_latest

from engine.base import EngineStats
from server.config import load_settings
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu-vllm")
KUSTOMIZATIONS = ("base", *(f"overlays/{o}" for o in OVERLAYS))
# validated against the oldest Kubernetes still served by the big clouds and the newest schemas
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRDS: dict[tuple[str, str], Any] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
}
# created by the operator before the first apply (kubectl create secret ...; README, kustomization.yaml)
OPERATOR_SECRETS = {"turnout-api-keys", "vllm-api-key"}
sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
from dashboard import dashboard  # noqa: E402


def _tool(*names: str) -> list[str]:
    """The first of ``names`` whose `version` runs (`docker compose` is a plugin that may be
    missing where `docker` is not); CI must have one."""
    for name in names:
        command = name.split()
        probe = [*command, "version", *(["--client"] if command == ["kubectl"] else [])]
        if shutil.which(command[0]) and subprocess.run(probe, capture_output=True).returncode == 0:
            return command
    if os.environ.get("CI"):
        pytest.fail(f"none of {names} found: the machine image ships kubectl, .ci/run installs docker-compose")
    pytest.skip(f"none of {names} on PATH")


def _render(kustomization: str) -> list[dict[str, Any]]:
    kubectl = _tool("kubectl")  # kustomize is built in (kubectl kustomize)
    out = subprocess.run([*kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {k: _render(k) for k in KUSTOMIZATIONS}


def _objects(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kustomization, objects in rendered.items():
        for obj in objects:
            yield kustomization, obj


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def _gateway(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(objects, "Deployment", "turnout")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _gateway_config(objects: list[dict[str, Any]], tmp_path: Path) -> Any:
    """The turnout.yaml the gateway reads, loaded by turnout's own settings loader."""
    volumes = _gateway(objects)["spec"]["template"]["spec"]["volumes"]
    name = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
    path = tmp_path / "turnout.yaml"
    path.write_text(_one(objects, "ConfigMap", name)["data"]["turnout.yaml"])
    return load_settings(path)


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = set()
    for kustomization, obj in _objects(rendered):
        kinds.add(obj["kind"])
        where = f"{kustomization}: {obj['kind']}/{obj['metadata']['name']}"
        model = CRDS.get((obj["apiVersion"], obj["kind"]))
        if model is not None:
            # the CRD's model keeps only the fields the CRD defines: a misspelt or misplaced one is lost
            parsed = model.model_validate(obj).model_dump(by_alias=True, exclude_none=True, mode="json")
            assert parsed == obj, f"{where}: fields the CRD does not define"
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} invalid for Kubernetes {version}: {exc.caught}")
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ServiceMonitor", "ScaledObject"} <= kinds


def test_a_misspelt_field_fails_validation() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {"containers": [{"name": "c"}]}}},
    }
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "cpu", "metadata": {"value": "70"}}]},
    }
    assert ScaledObject.model_validate(scaled).model_dump(by_alias=True, exclude_none=True, mode="json") == scaled
    scaled["spec"]["maxReplicas"] = 3  # HPA's spelling, not KEDA's
    assert ScaledObject.model_validate(scaled).model_dump(by_alias=True, exclude_none=True, mode="json") != scaled


def test_selectors_and_references_resolve_within_each_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for kustomization, objects in rendered.items():
        pods = [o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] == "Deployment"]
        services = [o for o in objects if o["kind"] == "Service"]
        names = {(o["kind"], o["metadata"]["name"]) for o in objects}

        def selects_a_pod(selector: dict[str, str], pods: list[dict[str, str]] = pods) -> bool:
            return any(selector.items() <= labels.items() for labels in pods)

        for obj in objects:
            where = f"{kustomization}: {obj['kind']}/{obj['metadata']['name']}"
            spec = obj.get("spec", {})
            assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "turnout", where
            if obj["kind"] == "Service":
                assert selects_a_pod(spec["selector"]), where
            if obj["kind"] == "PodDisruptionBudget":
                assert selects_a_pod(spec["selector"]["matchLabels"]), where
            if obj["kind"] == "ServiceMonitor":
                wanted = spec["selector"]["matchLabels"].items()
                matched = [s for s in services if wanted <= s["metadata"]["labels"].items()]
                ports = {p["name"] for s in matched for p in s["spec"]["ports"]}
                assert matched and {e["port"] for e in spec["endpoints"]} <= ports, where
            if obj["kind"] in ("ScaledObject", "HorizontalPodAutoscaler"):
                assert ("Deployment", spec["scaleTargetRef"]["name"]) in names, where
            if obj["kind"] == "Deployment":
                pod = spec["template"]["spec"]
                assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
                for volume in pod.get("volumes", []):
                    if "configMap" in volume:
                        assert ("ConfigMap", volume["configMap"]["name"]) in names, where
                    if "secret" in volume:
                        assert volume["secret"]["secretName"] in OPERATOR_SECRETS, where
                for container in pod["containers"]:
                    for env in container.get("env", []):
                        ref = env.get("valueFrom", {}).get("secretKeyRef")
                        assert ref is None or ref["name"] in OPERATOR_SECRETS, where
                    mounts = {m["name"] for m in container.get("volumeMounts", [])}
                    assert mounts <= {v["name"] for v in pod.get("volumes", [])}, where
        # one autoscaler per Deployment: two would fight over its replica count
        scalers = [o for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
        targets = [o["spec"]["scaleTargetRef"]["name"] for o in scalers]
        assert len(targets) == len(set(targets)), kustomization


def test_the_gateway_serves_the_config_and_keys_it_mounts(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    for kustomization, objects in rendered.items():
        gateway = _gateway(objects)
        container = _container(gateway)
        config_path = Path(container["args"][container["args"].index("--config") + 1])
        mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
        assert config_path == mounts["config"] / "turnout.yaml", kustomization
        settings = _gateway_config(objects, tmp_path)
        assert settings.server.api_keys_file == mounts["api-keys"] / "api-keys", kustomization
        assert settings.server.port == container["ports"][0]["containerPort"] == 8000
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        pod = gateway["spec"]["template"]["spec"]
        user = pod["securityContext"]
        assert user["runAsNonRoot"] and user["runAsUser"] == 10001  # the image's user (Dockerfile)
        # the preStop pause plus uvicorn's 30 s for in-flight streams fit in the grace period
        assert pod["terminationGracePeriodSeconds"] >= 5 + 30
        assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
        env = {e["name"] for e in container.get("env", [])}
        services = {
            (o["metadata"]["name"], p["port"]) for o in objects if o["kind"] == "Service" for p in o["spec"]["ports"]
        }
        for expert in settings.experts:
            if expert.engine == "remote":
                assert expert.api_key_env in env, f"{kustomization}: {expert.name} key is not in the pod"
                url = urlparse(expert.base_url)
                assert (url.hostname, url.port) in services, f"{kustomization}: {expert.base_url} is no Service"


def test_the_overlays_deploy_what_they_say(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    cpu = _gateway_config(rendered["overlays/cpu"], tmp_path)
    assert all(e.engine == "embedded" for e in cpu.experts) and cpu.router.coe is not None
    assert len(cpu.experts) >= 3
    gpu_objects = rendered["overlays/gpu-vllm"]
    gpu = _gateway_config(gpu_objects, tmp_path)
    remote = [e for e in gpu.experts if e.engine == "remote"]
    assert remote and gpu.router.coe is not None and gpu.router.coe.fallback not in {e.name for e in remote}
    for expert in remote:
        host = urlparse(expert.base_url).hostname
        vllm = _container(_one(gpu_objects, "Deployment", host))
        assert f"--served-model-name={expert.remote_model}" in vllm["args"]
        assert f"--max-model-len={expert.max_model_len}" in vllm["args"]
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
        scaler = _one(gpu_objects, "ScaledObject", host)
        assert "vllm:num_requests_waiting" in scaler["spec"]["triggers"][0]["metadata"]["query"]
    # the gateway scales on CPU and on its queue in the cpu overlay
    scaler = _one(rendered["overlays/cpu"], "ScaledObject", "turnout")
    assert {t["type"] for t in scaler["spec"]["triggers"]} == {"cpu", "prometheus"}


# KEDA's prometheus trigger: its metadata is a free-form map in the CRD, so check the keys here
PROMETHEUS_TRIGGER_REQUIRED = {"serverAddress", "query", "threshold"}
PROMETHEUS_TRIGGER_OPTIONAL = {"activationThreshold", "namespace", "ignoreNullValues", "unsafeSsl", "customHeaders"}


def test_autoscalers_own_the_replica_count_and_query_what_is_scraped(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for kustomization, objects in rendered.items():
        scalers = [o for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
        for target in {o["spec"]["scaleTargetRef"]["name"] for o in scalers}:
            # a fixed count would be reset by every apply, killing the pods the autoscaler added
            assert "replicas" not in _one(objects, "Deployment", target)["spec"], f"{kustomization}: {target}"
        monitored = {
            s["metadata"]["name"]
            for m in objects
            if m["kind"] == "ServiceMonitor"
            for s in objects
            if s["kind"] == "Service"
            and m["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        }
        for scaler in (o for o in objects if o["kind"] == "ScaledObject"):
            for trigger in (t for t in scaler["spec"]["triggers"] if t["type"] == "prometheus"):
                keys = set(trigger["metadata"])
                assert PROMETHEUS_TRIGGER_REQUIRED <= keys <= PROMETHEUS_TRIGGER_REQUIRED | PROMETHEUS_TRIGGER_OPTIONAL
                float(trigger["metadata"]["threshold"])
                query = trigger["metadata"]["query"]
                # the labels Prometheus Operator puts on what a ServiceMonitor scrapes
                assert set(re.findall(r'namespace="([^"]+)"', query)) == {"turnout"}, query
                services = set(re.findall(r'service="([^"]+)"', query))
                assert services and services <= monitored, f"{kustomization}: {query} reads no scraped Service"


def test_autoscaler_queries_name_metrics_turnout_exports(rendered: dict[str, list[dict[str, Any]]]) -> None:
    stats = {"x": EngineStats(num_running=1, num_waiting=2, kv_cache_usage=0.5)}
    exported = set(re.findall(r"^(turnout:\w+)", generate_latest(Metrics(lambda: stats, dict).registry).decode(), re.M))
    asked = [
        name
        for _, obj in _objects(rendered)
        if obj["kind"] == "ScaledObject"
        for trigger in obj["spec"]["triggers"]
        for name in re.findall(r"turnout:\w+", trigger["metadata"].get("query", ""))
    ]
    assert asked and set(asked) <= exported, set(asked) - exported


def test_the_dashboard_config_map_is_the_generated_dashboard(rendered: dict[str, list[dict[str, Any]]]) -> None:
    board = _one(rendered["base"], "ConfigMap", "turnout-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["turnout.json"]) == dashboard()  # python deploy/grafana/dashboard.py


def test_the_deploy_files_are_yamllint_clean() -> None:
    files = [str(p) for p in (ROOT / "deploy").rglob("*.y*ml")] + [str(ROOT / "docker-compose.yml")]
    files.append(str(ROOT / "turnout.example.yaml"))
    out = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-c", str(ROOT / ".yamllint.yaml"), *files],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_compose_reads_the_compose_file() -> None:
    compose = _tool("docker compose", "docker-compose")
    out = subprocess.run([*compose, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == {"turnout", "prometheus", "grafana"}
    assert services["turnout"]["build"]["target"] == "cpu"


def test_the_dockerfile_stages_hold_together() -> None:
    """No Docker engine here: the stage graph is read from the file. Every stage a FROM or a
    COPY --from names is defined above it, `docker build` without a target gives cpu, and the
    gpu target installs the extras `engine: vllm` and the Triton kernels need."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.match(r"FROM (\S+) AS (\S+)", line):
            parent, stage = m.groups()
            assert parent.startswith("${") or parent in stages, f"{stage} is built FROM unknown {parent}"
            stages[stage] = ""
        elif stages:
            stages[list(stages)[-1]] += line + "\n"
            if m := re.search(r"COPY --from=(\S+)", line):
                assert m.group(1) in stages, f"COPY --from={m.group(1)} names no earlier stage"
    assert list(stages)[-1] == "cpu"  # the default target
    assert 'pip install --no-cache-dir -e ".[gpu,vllm]"' in stages["build-gpu"]
    assert "--index-url" not in stages["build-gpu"]  # PyPI's torch: the CUDA build
    for target, venv in (("cpu", "build"), ("gpu", "build-gpu")):
        assert f"COPY --from={venv} /opt/venv /opt/venv" in stages[target]

"""Deployment files: validated against real schemas offline (Kubernetes 1.37 via kubernetes-validate, the Compose
spec via check-jsonschema's vendored schema), plus the fields that matter for operating the server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_strictly(path):
    import kubernetes_validate

    for doc in _docs(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_deployment_requests_gpu_probes_and_readonly_mounts():
    (dep,) = _docs(DEPLOY / "k8s" / "deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/adapters"]["readOnly"]


def test_hpa_scales_on_waiting_requests_custom_metric():
    (hpa,) = _docs(DEPLOY / "k8s" / "hpa.yaml")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "mtlora_num_requests_waiting"
    rules = yaml.safe_load(_docs(DEPLOY / "k8s" / "prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == "mtlora_num_requests_waiting"


def test_multi_replica_example_has_several_replicas_and_budget():
    docs = _docs(DEPLOY / "k8s" / "multi-replica.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert kinds["Deployment"]["spec"]["replicas"] >= 2
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1


def test_compose_file_matches_compose_spec_and_wires_monitoring():
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yaml").read_text())
    jsonschema.validate(compose, get_builtin_schema("vendor.compose-spec"))
    services = compose["services"]
    assert set(services) == {"mtlora", "prometheus", "grafana"}
    mounts = [v for v in services["mtlora"]["volumes"] if isinstance(v, dict)]
    assert all(m["read_only"] for m in mounts if m["target"].startswith(("/models", "/adapters")))
    assert "/health" in " ".join(services["mtlora"]["healthcheck"]["test"])
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["mtlora:8000"]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_run_as_non_root_with_healthcheck(name):
    text = (DEPLOY / "docker" / name).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, flags=re.M)
    assert "ENTRYPOINT" in text and "mtlora-serve" in text


def _dashboard_metrics() -> set[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "mtlora.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set()
    for expr in exprs:
        for name in re.findall(r"mtlora:[a-z0-9_]+", expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_dashboard_panels_cover_the_operational_views():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "mtlora.json").read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for view in ("throughput", "first token", "inter-token", "queue", "kv cache", "by adapter", "expert usage",
                 "prefix cache", "end-to-end", "queue time", "rejected", "resident", "adapter wait"):
        assert view in titles
    assert any(p["type"] == "heatmap" for p in dash["panels"])


def test_dashboard_queries_only_metrics_the_server_exports():
    """Every metric a Grafana panel queries exists in the server's /metrics output (after one request)."""
    import sys

    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT / "tests"))
    from fakes import FakeEngine
    from mtlora_server.api import ServerArgs, build_app

    engine = FakeEngine(adapters={"math": "/m"})    # an adapter, so per-adapter routing gauges are exported
    with TestClient(build_app(engine, ServerArgs(), manage_engine=True)) as client:
        assert client.post("/v1/completions", json={"model": "math", "prompt": "a", "max_tokens": 2,
                                                    "stream": True}).status_code == 200
        engine.max_running = engine.max_waiting = 0       # one queue-full refusal: requests_rejected_total
        assert client.post("/v1/completions", json={"model": "math", "prompt": "a"}).status_code == 429
        exported = {line.split("{")[0].split(" ")[0] for line in client.get("/metrics").text.splitlines()
                    if line.startswith("mtlora:")}
    exported |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in exported}
    missing = _dashboard_metrics() - exported
    assert not missing, f"dashboard queries metrics the server does not export: {sorted(missing)}"
    hpa_metric = "mtlora:num_requests_waiting"
    assert hpa_metric in exported

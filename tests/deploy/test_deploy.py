"""The deployment files agree with the service and with each other: every metric a dashboard, the
autoscaler or the Prometheus adapter names is one service/metrics.py exports; every GENSERVE_* variable
is a setting; probes, ports, users, names and selectors match across the Dockerfile, compose and
Kubernetes files. (Schema validation, hadolint and the container smoke test are `make test-container`.)
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.metrics import Metrics
from service.registry import WORKER_STOP_TIMEOUT_S
from service.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the deploy tools (make deploy-tools)")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes" / "gpu"
METRIC_RE = re.compile(r"\bgenserve_[a-z_]+\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def exported_series() -> set[str]:
    """Every series name Prometheus sees from the service: counters get _total, histograms _bucket/_sum/_count."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def setting_names() -> set[str]:
    return {"GENSERVE_" + name.upper() for name in Settings.model_fields}


def test_dashboard_adapter_and_autoscaler_use_exported_metrics() -> None:
    series = exported_series()
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/genserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    assert used - series == set(), f"the dashboard queries metrics the service does not export: {used - series}"
    # The panels: request rate, latency quantiles, queue depth, batch size, outliers, device memory.
    assert {
        "genserve_requests_total",
        "genserve_request_seconds_bucket",
        "genserve_queue_images",
        "genserve_batch_images_sum",
        "genserve_outliers_flagged_total",
        "genserve_device_memory_bytes",
    } <= used
    assert all(f"histogram_quantile({q}," in " ".join(exprs) for q in ("0.5", "0.95", "0.99"))

    hpa = load_yaml(K8S / "hpa.yaml")
    hpa_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    adapter = load_yaml(ROOT / "deploy/monitoring/prometheus-adapter-values.yaml")
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    queried = {m for rule in adapter["rules"]["custom"] for m in METRIC_RE.findall(rule["seriesQuery"])}
    assert hpa_metrics <= served, "the autoscaler scales on a metric the Prometheus adapter does not serve"
    assert served <= series and queried <= series


def test_deployment_probes_resources_and_references() -> None:
    deployment = load_yaml(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = load_yaml(K8S / "service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports.keys()
    pdb = load_yaml(K8S / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = load_yaml(K8S / "hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    configmap = load_yaml(K8S / "configmap.yaml")
    secret = load_yaml(K8S / "secret.example.yaml")
    refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    assert refs == {"configMapRef": configmap["metadata"]["name"], "secretRef": secret["metadata"]["name"]}
    assert set(configmap["data"]) | set(secret["stringData"]) <= setting_names()
    assert configmap["data"]["GENSERVE_DEVICES"] == "auto"
    assert set(secret["stringData"]) == {"GENSERVE_API_KEYS"}


def seconds(text: str) -> float:
    """A Compose duration such as "40s" or "1m30s" in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, f"not a duration: {text!r}"
    return sum(int(v) * units[u] for v, u in zip(parts.groups(), "hms", strict=True) if v)


def test_orchestrators_wait_longer_than_the_drain() -> None:
    """SIGKILL must not cut the graceful shutdown short: Kubernetes' grace period covers the preStop
    sleep, GENSERVE_SHUTDOWN_TIMEOUT_S for requests in flight and the wait for the workers' last
    batches; Compose's stop_grace_period the last two at the default timeout."""
    deployment = load_yaml(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = int(load_yaml(K8S / "configmap.yaml")["data"]["GENSERVE_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + drain + WORKER_STOP_TIMEOUT_S
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]["genserve"]
    default = Settings.model_fields["shutdown_timeout_s"].default
    assert seconds(compose["stop_grace_period"]) >= default + WORKER_STOP_TIMEOUT_S


def test_kustomizations_list_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == manifests
    cpu = load_yaml(ROOT / "deploy/kubernetes/cpu/kustomization.yaml")
    assert cpu["resources"] == ["../gpu"]
    patched = " ".join(p["patch"] for p in cpu["patches"])
    assert "nvidia.com~1gpu" in patched and "GENSERVE_DEVICES" in patched


def test_compose_service_prometheus_and_grafana_agree() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")
    genserve = compose["services"]["genserve"]
    assert genserve["ports"] == ["${GENSERVE_PORT:-8000}:8000"]
    assert "/readyz" in " ".join(genserve["healthcheck"]["test"])
    assert set(genserve["environment"]) == setting_names()  # every setting can be passed through
    assert any(v.endswith(":" + genserve["environment"]["GENSERVE_MODEL_DIR"] + ":ro") for v in genserve["volumes"])
    assert genserve["build"]["target"] == "cpu"

    gpu = load_yaml(ROOT / "docker-compose.gpu.yml")["services"]["genserve"]
    assert gpu["build"]["target"] == "cuda"
    assert gpu["environment"]["GENSERVE_DEVICES"] == "${GENSERVE_DEVICES:-auto}"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]

    prometheus = load_yaml(ROOT / "docker/prometheus/prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["genserve:8000"]

    (datasource,) = load_yaml(ROOT / "docker/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/genserve.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}
    (provider,) = load_yaml(ROOT / "docker/grafana/provisioning/dashboards/genserve.yml")["providers"]
    mounts = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert provider["options"]["path"] in mounts


def test_dockerfile_targets_user_and_healthcheck() -> None:
    text = (ROOT / "docker/Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "ARG BASE_IMAGE=debian:bookworm-slim"
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert {"cpu", "cuda"} <= set(stages) and stages[-1] == "cpu", "cpu must be the default (last) target"
    assert re.search(r"^HEALTHCHECK .*\n.*/readyz", text, flags=re.M)
    (user,) = re.findall(r"^USER (\d+):(\d+)$", text, flags=re.M)
    deployment = load_yaml(K8S / "deployment.yaml")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert user == (str(context["runAsUser"]), str(context["runAsGroup"])) and user[0] != "0"
    assert "EXPOSE 8000" in text and "GENSERVE_MODEL_DIR=/models" in text


def test_dockerignore_keeps_what_the_image_needs() -> None:
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything else stays out of the build context"
    needed = ["pyproject.toml", "README.md", "models/", "service/", "checkpoints/"]
    needed += ["docker/wheels/", "docker/install.sh"]
    for path in needed:
        assert "!" + path in rules, f"{path} is left out of the build context"


def test_smoke_client_png_is_a_28x28_grayscale_image() -> None:
    spec = importlib.util.spec_from_file_location("smoke_client", ROOT / "docker/smoke_client.py")
    assert spec is not None and spec.loader is not None
    smoke_client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke_client)
    image = Image.open(io.BytesIO(smoke_client.gray_png(28, 28)))
    image.load()
    assert (image.mode, image.size) == ("L", (28, 28))
    assert image.getpixel((0, 0)) == 0 and image.getpixel((27, 27)) == 255


def test_prometheus_loads_alert_rules_on_exported_metrics() -> None:
    prometheus = load_yaml(ROOT / "docker/prometheus/prometheus.yml")
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]["prometheus"]
    mounts = {v.split(":")[1] for v in compose["volumes"]}
    assert set(prometheus["rule_files"]) <= mounts
    rules = load_yaml(ROOT / "docker/prometheus/alerts.yml")
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    assert used <= exported_series()
    assert {"genserve_drift_binomial_p_value", "genserve_drift_ks_p_value", "genserve_model_reload_failed"} <= used

"""The Kubernetes manifests (deploy/, Kustomize: no Helm engine installs here, helm-sdkpy needs Python 3.12) as
`kubectl kustomize` renders them, every core object validated against the Kubernetes schemas
(kubernetes-validate), their wiring checked (probes, grace period, GPU, volumes, selectors, autoscaler and its
metric), and the autoscaler's queue-time expression computed from a real Triton's /metrics, idle and under load."""

from __future__ import annotations

import re
import subprocess
import threading
import urllib.request

import kubernetes_validate
import pytest
import yaml

from anomaly.config import load_settings
from tests.conftest import REPO, SAMPLES

K8S_VERSION = "1.32.0"  # this machine's kubectl; the schemas of the oldest Kubernetes still supported upstream


def pod_settings(monkeypatch, env: dict):
    """The settings a container of the image reads: the Dockerfile's ENV, then what the manifest sets (nothing from
    this test process's environment, where the session's Triton has set ports of its own)."""
    from anomaly.config import KNOBS

    for knob in KNOBS:
        monkeypatch.delenv(knob.name, raising=False)
    image_env = re.search(r"^ENV RUNPOD_SERVERLESS=.*?(?=^\S)", (REPO / "Dockerfile").read_text(), re.M | re.S)
    for name, value in re.findall(r"(\w+)=(\S+)", image_env.group(0)):
        monkeypatch.setenv(name, value)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return load_settings()


def render(folder: str) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(REPO / folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> dict:
    return {doc["kind"]: doc for doc in render("deploy")}


@pytest.mark.parametrize("folder", ["deploy", "deploy/prometheus-adapter"])
def test_every_rendered_object_is_valid_kubernetes(folder):
    docs = render(folder)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises, naming the field, when invalid


def test_an_invalid_object_is_caught():
    """The validation above can fail: a misspelt field and a wrong type are refused."""
    bad = render("deploy")
    deployment = next(d for d in bad if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    del deployment["spec"]["template"]["spec"]["terminationGracePeriod"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_pod_serves_stops_and_scales_as_the_service_needs(objects, monkeypatch):
    settings = pod_settings(monkeypatch, objects["ConfigMap"]["data"])  # every setting given is one it accepts
    pod = objects["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert spec["terminationGracePeriodSeconds"] > settings.shutdown_grace_s  # drained before the kubelet kills
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"triton-http": settings.triton_http_port, "triton-grpc": settings.triton_grpc_port,
                     "metrics": settings.triton_metrics_port, "api": settings.api_port}  # fmt: skip
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "api"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "triton-http"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.triton_metrics_port)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["weights"] == "/models" and str(settings.model_repository).startswith("/models/")
    assert (
        volumes["weights"]["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert container["envFrom"][0]["configMapRef"]["name"] == objects["ConfigMap"]["metadata"]["name"]

    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector and selector.items() <= labels.items(), kind
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]


def test_nothing_secret_is_in_the_manifests():
    for folder in ("deploy", "deploy/kserve", "deploy/prometheus-adapter"):
        for doc in render(folder):
            assert doc["kind"] != "Secret", folder
            text = yaml.safe_dump(doc)
            for key, value in re.findall(r"(\w*(?:KEY|SECRET|TOKEN|PASSWORD)\w*): (\S+)", text, re.IGNORECASE):
                assert key in ("key", "secretKeyRef") or value in ("api-key", "anomaly-api-key"), (key, value)


def test_kserve_example_runs_the_same_image_with_settings_the_service_accepts(objects, monkeypatch):
    runtime, service = sorted(render("deploy/kserve"), key=lambda d: d["kind"])[::-1]
    assert (runtime["kind"], service["kind"]) == ("ServingRuntime", "InferenceService")
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    fmt = service["spec"]["predictor"]["model"]["modelFormat"]["name"]
    assert fmt in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    settings = pod_settings(monkeypatch, {env["name"]: env["value"] for env in container["env"]})
    assert container["readinessProbe"]["httpGet"]["port"] == settings.triton_http_port == 8080
    assert {p["containerPort"] for p in container["ports"]} == {settings.triton_grpc_port}
    assert settings.api_port not in (settings.triton_http_port, settings.triton_grpc_port)
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > settings.shutdown_grace_s


def adapter_rule() -> dict:
    (config,) = render("deploy/prometheus-adapter")
    (rule,) = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    return rule


def scrape(url: str) -> dict:
    """Triton's /metrics -> {(metric, model): value} for the counters the rule reads."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for name, labels, value in re.findall(r"^(\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        model = re.search(r'model="([^"]+)"', labels)
        values[(name, model.group(1) if model else "")] = values.get((name, model.group(1) if model else ""), 0)
        values[(name, model.group(1) if model else "")] += float(value)
    return values


def queue_us_per_frame(rule: dict, before: dict, after: dict) -> float:
    """The adapter rule's metricsQuery over the window between two scrapes of one pod: the increase of the
    numerator's series (every model) over the increase of the denominator's (the model it names)."""
    query = rule["metricsQuery"]
    (numerator,) = re.findall(r"rate\((\w+)\{<<\.LabelMatchers>>\}", query)
    denominator, model = re.findall(r'rate\((\w+)\{<<\.LabelMatchers>>,model="(\w+)"\}', query)[0]
    queued = sum(v - before.get(k, 0) for k, v in after.items() if k[0] == numerator)
    served = after.get((denominator, model), 0) - before.get((denominator, model), 0)
    return queued / max(served, 1e-3)


def test_the_autoscalers_queue_time_moves_with_the_load(triton, grpc_client):
    """Frames one after another wait next to nothing in Triton's queues; eight at once wait for each other. The
    expression the autoscaler follows (read from the adapter rule) says so from a real Triton's counters."""
    rule = adapter_rule()
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us")
    url = f"http://{triton.client_host}:{triton.settings.triton_metrics_port}/metrics"
    image = (SAMPLES / "pier_spalling.png").read_bytes()

    def frame():
        grpc_client.detect(image, confidence_threshold=0.25)  # defects: SAM runs

    start = scrape(url)
    for _ in range(3):
        frame()
    one_at_a_time = scrape(url)
    threads = [threading.Thread(target=frame) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    loaded = scrape(url)
    idle = queue_us_per_frame(rule, start, one_at_a_time)
    busy = queue_us_per_frame(rule, one_at_a_time, loaded)
    print(f"queue us per frame: one at a time {idle:.0f}, eight at once {busy:.0f}")
    assert busy > 5 * idle and busy > 50_000, (idle, busy)  # 8 frames at once on one SAM instance queue

"""deploy/kubernetes rendered offline with ``kubectl kustomize`` (base: GPU, overlays/cpu), checked
for what the Gateway API inference extension's endpoint picker needs: pods the InferencePool
selects, labelled as vLLM-dialect engines, the picker wired to the pool with the LoRA-affinity
scorer, and the metric families its vLLM mapping reads, made by this server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.metrics import ServerMetrics
from server.settings import Settings
from tests.server.picker import ENGINE_LABEL, LEGACY_ENGINE_LABEL, VLLM

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(path: str) -> dict[tuple[str, str], dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}


@pytest.fixture(scope="module", params=["base", "overlays/cpu"])
def objs(request):
    return request.param, render(request.param)


def container(deploy: dict, name: str | None = None) -> dict:
    cs = deploy["spec"]["template"]["spec"]["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def env(c: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_model_server_deployment(objs):
    variant, o = objs
    d = o[("Deployment", "moleserve")]
    c, spec = container(d), d["spec"]["template"]["spec"]
    e = env(c)
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert str(port) == e["MOLESERVE_PORT"] and e["MOLESERVE_HOST"] == "0.0.0.0"
    # probes: alive on /health, ready on /ready (503 while draining takes the pod out of the pool)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health" and c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    grace = float(e.get("MOLESERVE_GRACE_PERIOD") or Settings().grace_period)
    assert spec["terminationGracePeriodSeconds"] > grace
    # keys from the Secret, never literal
    for var, key in (("MOLESERVE_API_KEY", "api-key"), ("MOLESERVE_ADMIN_KEY", "admin-key")):
        ref = e[var]["secretKeyRef"]
        assert ref["key"] == key and ("Secret", ref["name"]) in o
    # the bank volume, read-only, served with --banks
    mount = next(m for m in c["volumeMounts"] if m["name"] == "banks")
    assert mount["readOnly"] and c["args"][c["args"].index("--banks") + 1] == mount["mountPath"]
    vol = next(v for v in spec["volumes"] if v["name"] == "banks")
    assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in o
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    if variant == "base":
        assert res["limits"]["nvidia.com/gpu"] == "1" and e["MOLESERVE_DEVICE"] == "cuda"
        assert c["image"].startswith("ghcr.io/moleserve/moleserve:")
    else:
        assert "nvidia.com/gpu" not in str(res) and e["MOLESERVE_DEVICE"] == "cpu"
        assert c["image"].startswith("ghcr.io/moleserve/moleserve-cpu:")


def test_pool_route_and_picker_fit_together(objs):
    _, o = objs
    d, pool = o[("Deployment", "moleserve")], o[("InferencePool", "moleserve")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[ENGINE_LABEL] == labels[LEGACY_ENGINE_LABEL] == "vllm"  # read in vLLM's dialect
    ports = {p["containerPort"] for p in container(d)["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= ports
    # the pool's picker is the EPP Service, on its ext-proc port
    ref = pool["spec"]["endpointPickerRef"]
    svc = o[("Service", ref["name"])]
    assert ref["port"]["number"] in {p["port"] for p in svc["spec"]["ports"]}
    epp = o[("Deployment", ref["name"])]
    assert svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    args = dict(a.lstrip("-").split("=", 1) for a in container(epp, "epp")["args"])
    assert args["pool-name"] == pool["metadata"]["name"] and args["pool-group"] == "inference.networking.k8s.io"
    # the HTTPRoute sends to the pool
    route = o[("HTTPRoute", "moleserve")]
    [backend] = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == ("inference.networking.k8s.io", "InferencePool", "moleserve")
    # RBAC: the picker may watch pods and the pool
    rules = o[("Role", "moleserve-epp")]["rules"]
    assert any("pods" in r["resources"] for r in rules) and any("inferencepools" in r["resources"] for r in rules)


def test_picker_config_scores_lora_affinity(objs):
    _, o = objs
    epp = o[("Deployment", "moleserve-epp")]
    config_path = dict(a.lstrip("-").split("=", 1) for a in container(epp, "epp")["args"])["config-file"]
    mount = next(m for m in container(epp, "epp")["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = o[("ConfigMap", vol["configMap"]["name"])]  # the generated (hashed) name, as kustomize rewrote it
    config = yaml.safe_load(cm["data"][Path(config_path).name])
    assert config["kind"] == "EndpointPickerConfig"
    types = {p["type"]: p for p in config["plugins"]}
    assert "lora-affinity-scorer" in types
    assert types["core-metrics-extractor"]["parameters"]["defaultEngine"] == "vllm"
    assert types["metrics-data-source"]["parameters"]["path"] == "/metrics"
    [profile] = config["schedulingProfiles"]
    assert "lora-affinity-scorer" in {p["pluginRef"] for p in profile["plugins"]}


def test_server_makes_every_family_the_vllm_mapping_reads():
    m = ServerMetrics("base", max_lora=4)
    m.set_cache_config(16, 1000, "bfloat16")
    text = m.render().decode()
    for name in VLLM.values():
        assert f"\n{name}{{" in text or text.startswith(f"{name}{{"), name

"""docker/: the images install through scripts/install.sh (like make), and the compose, Prometheus,
Grafana files parse and fit together (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.engine.protocol import RequestStats, StepStats
from server.engine.routing_stats import BankRoutingStats, RoutingStats
from server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_install_like_make(name):
    text = (DOCKER / name).read_text()
    run_lines = " ".join(re.findall(r"^RUN .*(?:\n .*)*", text, flags=re.M))
    assert "VENV= " in run_lines and "scripts/install.sh" in run_lines
    assert "ensure_default_model" in run_lines  # the Makefile's `model` step
    assert "pip install" not in run_lines  # packages are listed once, by the install script
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), src
    assert re.search(r'^CMD \["moleserve", "serve"\]', text, flags=re.M)
    assert "MOLESERVE_TORCH=torch==2.13.0" in text
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install.sh" in makefile and "ensure_default_model" in makefile
    assert re.search(r"^serve:.*\n\t.*moleserve serve --host \$\(HOST\) --port \$\(PORT\)", makefile, flags=re.M)
    assert (DOCKER / f"{name}.dockerignore").exists()


def test_gpu_image_is_cuda():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, flags=re.M)
    assert "+cpu" not in text and "download.pytorch.org/whl/cpu" not in text
    assert "triton" in (ROOT / "pyproject.toml").read_text()  # pulled in by `pip install .` on Linux


def test_compose_parses_and_fits_together():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"moleserve", "moleserve-cpu", "prometheus", "grafana"} <= set(services)
    for name in ("moleserve", "moleserve-cpu"):
        s = services[name]
        assert (ROOT / s["build"]["dockerfile"]).exists() and s["build"]["context"] == ".."
        assert "8000:8000" in s["ports"]
        assert int(s["environment"]["MOLESERVE_GRACE_PERIOD"]) < int(s["stop_grace_period"].rstrip("s"))
    assert services["moleserve"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            assert (DOCKER / volume.split(":")[0]).exists(), volume


def test_prometheus_config_scrapes_the_server():
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert "moleserve:8000" in job["static_configs"][0]["targets"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_check_config():
    r = subprocess.run(["promtool", "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _all_metric_names() -> set[str]:
    m = ServerMetrics("base")
    m.on_step(StepStats(0, 0, 0, 0, 0, 0, 0, 1, routing=RoutingStats(
        banks={"d": BankRoutingStats(1, 1, 1, {(0, "q"): [1]}, [0, 1], [1], 0.1)})))
    m.on_request_finished(RequestStats("r", None, 1, 1, "stop", 0.0, 0.1, 0.2, [0.1]))
    m.on_bank_operation("load", 0.1, ok=True)
    m.on_rejected("overloaded")
    return {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(m.render().decode())}


def test_grafana_provisioning_and_dashboard_cover_every_metric():
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    uid = ds["datasources"][0]["uid"]
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/moleserve.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DOCKER / "grafana/dashboards/moleserve.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            exprs.append(target["expr"])
    text = "\n".join(exprs)
    missing = [n for n in _all_metric_names() if not re.search(re.escape(n) + r"(_bucket|_sum|_count)?\b", text)]
    assert not missing, f"metrics without a panel: {missing}"
    used = set(re.findall(r"\b((?:vllm:|moleserve_)[a-z0-9_:]+)", text))
    unknown = {u for u in used if re.sub(r"_(bucket|sum|count)$", "", u) not in _all_metric_names()}
    assert not unknown, f"panels on metrics that do not exist: {unknown}"

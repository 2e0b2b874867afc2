"""Auth on every route; the bank routes exist only with an admin key; bank load / unload / errors."""

from __future__ import annotations

import pytest

from tests.server.test_errors import assert_error

API_ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
]
BANK_ROUTES = [
    ("GET", "/v1/banks", None),
    ("POST", "/v1/banks", {"name": "b", "path": "/nowhere"}),
    ("DELETE", "/v1/banks/b", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/nowhere"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "b"}),
]


def call(c, method, path, body):
    return c.request(method, path, json=body) if body is not None else c.request(method, path)


def test_api_key_guards_every_route_but_probes(serve):
    s = serve(api_key="k1", admin_key="adm")
    with s.client() as anon, s.client("wrong") as wrong, s.client("k1") as ok, s.client("adm") as admin:
        for method, path, body in API_ROUTES:
            for c in (anon, wrong):
                r = call(c, method, path, body)
                err = assert_error(r, 401)
                assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert call(ok, method, path, body).status_code == 200, path
            assert call(admin, method, path, body).status_code == 200, path
        for path in ("/health", "/ready", "/metrics"):
            assert anon.get(path).status_code == 200, path
        # a non-Bearer scheme is refused too
        assert_error(anon.get("/v1/models", headers={"Authorization": "Basic azE="}), 401)


def test_metrics_auth(serve):
    s = serve(api_key="k1", metrics_auth=True)
    with s.client() as anon, s.client("k1") as ok:
        assert_error(anon.get("/metrics"), 401)
        assert ok.get("/metrics").status_code == 200
        assert anon.get("/health").status_code == 200


def test_bank_routes_need_the_admin_key(serve):
    s = serve(api_key="k1", admin_key="adm")
    with s.client() as anon, s.client("k1") as user, s.client("adm") as admin:
        for method, path, body in BANK_ROUTES:
            for c in (anon, user):
                assert_error(call(c, method, path, body), 401)
            assert call(admin, method, path, body).status_code != 401, path


@pytest.mark.parametrize("settings", [{}, {"api_key": "k1"}])
def test_bank_routes_absent_without_admin_key(serve, settings):
    s = serve(**settings)
    with s.client("k1") as c:
        for method, path, body in BANK_ROUTES:
            assert_error(call(c, method, path, body), 404)
        assert "/v1/banks" not in c.get("/openapi.json").text


def test_bank_lifecycle(serve, tmp_path):
    (tmp_path / "bank-a").mkdir()
    s = serve(admin_key="adm")
    with s.client("adm") as c:
        r = c.post("/v1/banks", json={"name": "a", "path": str(tmp_path / "bank-a")})
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "a", "kind": "dynmole", "num_experts": 4, "version": 1}
        r = c.post("/v1/banks", json={"name": "a", "path": str(tmp_path / "bank-a")})  # replace
        assert r.json()["version"] == 2
        assert c.get("/v1/banks").json()["data"][0]["name"] == "a"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake-model", "a"]
        assert c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2}).status_code == 200
        assert c.delete("/v1/banks/a").json()["deleted"] is True
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake-model"]
        assert_error(c.post("/v1/completions", json={"model": "a", "prompt": "x"}), 404)
        # vLLM's names
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(tmp_path / "bank-a")})
        assert r.status_code == 200 and "Success" in r.text
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "v"}).status_code == 200
        metrics = c.get("/metrics").text
    assert 'moleserve_bank_events_total{action="load",result="ok"} 3.0' in metrics
    assert 'moleserve_bank_events_total{action="unload",result="ok"} 2.0' in metrics
    assert 'moleserve_bank_operation_duration_seconds_count{action="load"} 3.0' in metrics


def test_bank_errors(serve, tmp_path):
    (tmp_path / "busy").mkdir()
    s = serve(admin_key="adm")
    with s.client("adm") as c:
        assert_error(c.post("/v1/banks", json={"name": "x", "path": "/etc"}), 400, "outside")
        assert_error(c.post("/v1/banks", json={"name": "x", "path": str(tmp_path / "missing")}), 404, "does not exist")
        assert_error(c.delete("/v1/banks/none"), 404, "none")
        assert_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "none"}), 404)
        assert_error(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}), 400)
        c.post("/v1/banks", json={"name": "busy", "path": str(tmp_path / "busy")})
        err = assert_error(c.delete("/v1/banks/busy"), 409, "in use")
        assert err["type"] == "conflict_error"
        assert_error(c.post("/v1/banks", json={"name": "x"}), 422, "path")
        metrics = c.get("/metrics").text
    assert 'moleserve_bank_events_total{action="load",result="error"} 3.0' in metrics


def test_admin_key_without_registry_is_503(serve):
    s = serve(admin_key="adm", with_banks=False)
    with s.client("adm") as c:
        assert_error(c.get("/v1/banks"), 503, "registry")

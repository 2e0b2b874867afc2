"""moleserve on Ray Serve, on a 3-node ``ray.cluster_utils.Cluster`` on loopback with 2 engine
replicas of the tiny model: the same answers as the standalone server, a bank's requests stick to
one replica, and a node removed loses no request that had not started.

One cluster for the module (starting Ray costs tens of seconds on 2 cores); every call bounded."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.settings import Settings
from tests.server.conftest import ServerThread, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = "x-moleserve-replica"
KEY = "ray-key"


@pytest.fixture(scope="module")
def banks_dir(tiny_model_dir, tmp_path_factory):
    from adapters.storage import save_bank
    from tests.adapters.bank_builders import fingerprint_of, random_bank

    root = tmp_path_factory.mktemp("ray-banks")
    for i, name in enumerate(("alpha", "beta")):
        save_bank(random_bank("dynmole", fingerprint_of(tiny_model_dir), seed=i, name=name), root / name)
    return root


def _settings(tiny_model_dir, banks_dir) -> dict:
    return dict(model=str(tiny_model_dir), banks=str(banks_dir), api_key=KEY, max_num_seqs=8,
                kv_cache_memory=4 << 20, max_model_len=256)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, banks_dir):
    from ray.cluster_utils import Cluster

    from server.distributed.ray_serve import build_app

    # every node can hold one engine replica; the head also runs Serve's controller, proxy and ingress
    engine = {"moleserve_engine": 1}
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, resources=engine, include_dashboard=False))
    workers = [c.add_node(num_cpus=1, resources=engine) for _ in range(2)]
    c.wait_for_nodes(timeout=120)
    ray.init(address=c.address, runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}},
             include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    app = build_app({**_settings(tiny_model_dir, banks_dir), "num_replicas": 2, "num_cpus": 0,
                     "replica_resources": engine, "request_retries": 20})
    serve.run(app, name="moleserve", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the Serve application did not become ready")
        time.sleep(1)
    try:
        yield dict(url=url, cluster=c, workers=workers)
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def standalone(tiny_model_dir, banks_dir):
    from server.api.app import create_app
    from server.commands.serve import build_engine

    settings = Settings(**_settings(tiny_model_dir, banks_dir))
    engine, banks = build_engine(settings)
    with ServerThread(create_app(settings, engine, banks)) as st:
        yield f"http://127.0.0.1:{st.port}"


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


REQUESTS = [
    ("/v1/completions", dict(model="alpha", prompt="The sky is", max_tokens=8, temperature=0, ignore_eos=True)),
    ("/v1/completions", dict(prompt="Once upon", max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)),
    ("/v1/chat/completions", dict(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                  temperature=0, ignore_eos=True)),
    # errors: the same status and body
    ("/v1/completions", dict(model="nope", prompt="x")),
    ("/v1/completions", dict(model="alpha", prompt="x", max_tokens=100000)),
    ("/v1/chat/completions", dict(model="alpha", messages="not a list")),
]


def _comparable(r: httpx.Response):
    body = r.json()
    if r.status_code == 200:
        body = {"choices": body["choices"], "usage": body["usage"], "model": body["model"]}
    return r.status_code, body


def test_answers_equal_the_standalone_server(cluster, standalone):
    with client(cluster["url"]) as ray_c, client(standalone) as solo:
        for path, body in REQUESTS:
            got, want = ray_c.post(path, json=body), solo.post(path, json=body)
            assert _comparable(got) == _comparable(want), (path, body)
            if got.status_code == 200:
                assert got.headers[HEADER].startswith("EngineReplica#")
        # streaming: the same text, ending with [DONE] (a lagging reader may get two tokens in one event, on
        # either server, so the events' boundaries are not compared)
        body = dict(model="alpha", prompt="Count:", max_tokens=6, temperature=0, ignore_eos=True, stream=True)

        def texts(c):
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = [x for x in r.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            return [x for x in lines[:-1]]

        import json

        def strip(ls):
            events = [(d["choices"][0]["text"], d["choices"][0]["finish_reason"]) for d in map(lambda x: json.loads(x[6:]), ls)]
            assert all(text for text, _ in events) and [r for _, r in events] == [None] * (len(events) - 1) + ["length"]
            return "".join(text for text, _ in events)

        assert strip(texts(ray_c)) == strip(texts(solo))
        # auth is the standalone server's
        assert httpx.get(cluster["url"] + "/v1/models", timeout=30).status_code == 401
        models = ray_c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models][1:] == ["alpha", "beta"] and models[1]["parent"] == models[0]["id"]


def test_a_banks_requests_stick_to_one_replica(cluster):
    body = dict(model="alpha", prompt="hello", max_tokens=2, temperature=0)
    with client(cluster["url"]) as c:
        seen = [c.post("/v1/completions", json=body).headers[HEADER] for _ in range(8)]
        assert len(set(seen)) == 1, seen
        # concurrent requests within the replica's room stay there too
        with ThreadPoolExecutor(4) as pool:
            heads = list(pool.map(lambda _: c.post("/v1/completions", json=body).headers[HEADER], range(4)))
        assert set(heads) == set(seen), heads


def test_removing_a_node_loses_no_request_that_had_not_started(cluster):
    url, c = cluster["url"], cluster["cluster"]
    body = dict(model="alpha", prompt="hello", max_tokens=3, temperature=0)
    with client(url) as http:
        replica = http.post("/v1/completions", json=body).headers[HEADER]
    # the worker node that holds alpha's replica (if alpha lives on the head, use the other bank)
    from ray._private.state import actors  # the GCS's table (ray.util.state needs the dashboard)

    node_of = {a["Name"].rsplit("#", 1)[-1]: a["Address"]["NodeID"] for a in actors().values()
               if a["State"] == "ALIVE" and "EngineReplica" in (a.get("Name") or "")}
    victim_node = node_of[replica.rsplit("#", 1)[-1]]
    victim = next((w for w in cluster["workers"] if w.node_id == victim_node), None)
    if victim is None:  # alpha's replica is on the head: take a worker that holds the other replica
        victim = next(w for w in cluster["workers"] if w.node_id in node_of.values())
    c.remove_node(victim, allow_graceful=False)
    cluster["workers"].remove(victim)
    # Wait until the cluster knows the node's replica is dead: a request that had already started on
    # it before that may be lost (the promise is for requests that had not started); every
    # request sent after it, even one routed to the dead replica, must be answered.
    deadline = time.monotonic() + 90
    while any(a["Address"]["NodeID"] == victim.node_id and a["State"] == "ALIVE"
              and "EngineReplica" in (a.get("Name") or "") for a in actors().values()):
        assert time.monotonic() < deadline, "the removed node's replica is still reported alive"
        time.sleep(0.5)
    # requests sent now may be routed to the dead replica: they must all be answered
    with client(url) as http, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: http.post("/v1/completions", json=body), range(8)))
    assert [r.status_code for r in results] == [200] * 8, [r.text for r in results if r.status_code != 200]
    # the replica is replaced on the free node
    deadline = time.monotonic() + 120
    while True:
        status = serve.status().applications["moleserve"].deployments["EngineReplica"]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == 2:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)

"""serve.py in production: every field it accepts changes the output as OpenAI defines it (or is
refused), chunked prefill and the prefix cache leave greedy text unchanged, a failing row fails alone,
the model-health metrics, the request log and the dashboard, and hostile clients: a fuzzer driven by
the server's own OpenAPI schema, oversized bodies and prompts, idle connections, a thousand tiny
requests, and memory that stays flat. Every loop is bounded in count and time; servers listen on
127.0.0.1 only."""
import concurrent.futures
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import ENV, ROOT
from decode import generate
from test_serve import KEY, PROMPTS, Server, greedy, make_run, one_torch_thread, tok  # noqa: F401  (fixtures)

serve = importlib.import_module("serve")


@pytest.fixture(scope="module")
def small(workdir, tok):  # noqa: F811
    """A small modern model (fast steps) with a 256-token context, served with an API key and a request
    log that rotates at 4 KB."""
    make_run(str(workdir / "out-prod"), tok, "modern", n_layer=2, n_embd=64, block_size=256)
    server = Server(workdir, "--model=out-prod", f"--api_key={KEY}", "--log_requests=requests.jsonl",
                    "--log_max_mb=0.004", "--prefill_chunk=32")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def engine_run(model, tok, groups, *later, **settings):  # noqa: F811
    """Run groups [(prompt ids, Sampling)] through an engine, then each list in `later` once the ones
    before have finished. Returns the engine and {index: (text, last event)}, indexed across all."""
    engine = serve.Engine(model, tok, 16, 64, serve.Metrics(), "cpu", torch.float32, **settings)
    events = {}
    engine.thread.start()
    done = 0
    for batch in (groups, *later):
        seqs = [serve.Sequence(done + i, s, lambda ev: events.setdefault(ev["index"], []).append(ev),
                               time.monotonic()) for i, (_, s) in enumerate(batch)]
        engine.submit([serve.Group(ids, [s]) for (ids, _), s in zip(batch, seqs)])
        done += len(batch)
        deadline = time.monotonic() + 60
        while sum(1 for e in events.values() if "error" in e[-1] or e[-1]["finish_reason"]) < done \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    engine.stop()
    return engine, {i: ("".join(e.get("text", "") for e in evs), evs[-1]) for i, evs in events.items()}


def reference(model, ids, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding with OpenAI's definitions, written out: each step, every token's logit drops by
    presence once it has been generated and by frequency for each time it was; bias is added."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0][0, -1].clone()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            logits -= frequency * counts + presence * (counts > 0)
            for t, b in (bias or {}).items():
                logits[t] += b
            out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_follow_openai(tmp_path, tok):  # noqa: F811
    model = make_run(str(tmp_path), tok, "modern", n_layer=2, n_embd=64)
    prompts = [tok.encode(p) for p in PROMPTS[:6]]
    cases = [dict(), dict(presence=1.5), dict(frequency=0.7), dict(presence=-0.5, frequency=1.0),
             dict(bias={7: 5.0, 11: -100.0}), dict(frequency=2.0, bias={3: 2.5})]
    groups = [(ids, serve.Sampling(0.0, None, 1.0, 24, None, None, [], True, c.get("presence", 0.0),
                                   c.get("frequency", 0.0), c.get("bias"))) for ids, c in zip(prompts, cases)]
    _, got = engine_run(model, tok, groups)
    for i, (ids, c) in enumerate(zip(prompts, cases)):
        want = reference(model, ids, 24, c.get("presence", 0.0), c.get("frequency", 0.0), c.get("bias"))
        assert got[i][0] == tok.decode(want), (i, c)
    plain = reference(model, prompts[1], 24)
    assert reference(model, prompts[1], 24, presence=1.5) != plain  # the penalty is not a no-op here


def test_every_field_is_honoured_or_refused(small, tok, workdir):  # noqa: F811
    from checkpoint import open_model
    model = open_model(str(workdir / "out-prod")).model
    c = small.client()
    ids = tok.encode("def ")
    for kw, ref in [(dict(), {}), (dict(presence_penalty=2.0), dict(presence=2.0)),
                    (dict(frequency_penalty=1.5), dict(frequency=1.5)),
                    (dict(logit_bias={"300": 100}), dict(bias={300: 100.0})),
                    (dict(logit_bias={"65": 4.5, "66": -100}, frequency_penalty=-1.0), dict(bias={65: 4.5, 66: -100.0},
                                                                                              frequency=-1.0))]:
        got = c.completions.create(model="out-prod", prompt="def ", max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True},
                                   **kw).choices[0].text
        assert got == tok.decode(reference(model, ids, 24, **ref)), kw
    assert tok.decode(reference(model, ids, 24, bias={300: 100.0})) == tok.decode([300]) * 24
    plain = c.completions.create(model="out-prod", prompt="def ", max_tokens=8, temperature=0).choices[0].text
    assert c.completions.create(model="out-prod", prompt="def ", max_tokens=8, temperature=0, seed=5,
                                user="someone").choices[0].text == plain  # user: for the log; seed: unused when greedy
    refused = dict(best_of=2, suffix="x", tools=[{"type": "function"}], response_format={"type": "json_object"},
                   logit_bias={"-1": 1.0}, top_k=2 ** 63, seed=2 ** 80, n=1000, presence_penalty=3.0)
    for field, value in refused.items():
        r = httpx.post(small.url + "/v1/completions", json={"model": "out-prod", "prompt": "x", field: value},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)


def test_chunked_prefill_and_prefix_cache_leave_greedy_text_unchanged(tmp_path, tok):  # noqa: F811
    """Prompts that share a 150-token beginning, twice over (the second round finds it cached), prefilled
    whole, in chunks of 16 tokens, and through the prefix cache: the same greedy text every way."""
    model = make_run(str(tmp_path), tok, "modern", n_layer=2, n_embd=64)
    shared = tok.encode(" ".join(f"x{i} = {i * i}" for i in range(60)))[:150]
    prompts = [shared + tok.encode(p) for p in PROMPTS[:8]] * 2
    rounds = lambda: [[(ids, serve.Sampling(0.0, None, 1.0, 20, None, None, [])) for ids in prompts[:8]]] * 2  # noqa
    _, whole = engine_run(model, tok, *rounds())
    _, chunked = engine_run(model, tok, *rounds(), prefill_chunk=16)
    cached_engine, cached = engine_run(model, tok, *rounds(), prefix_cache=4096)
    both_engine, both = engine_run(model, tok, *rounds(), prefill_chunk=16, prefix_cache=4096)
    texts = lambda r: [r[i][0] for i in range(len(prompts))]  # noqa: E731
    assert texts(whole) == texts(chunked) == texts(cached) == texts(both)
    assert len(set(texts(whole)[:8])) == 8 and all(len(set(t)) > 3 for t in texts(whole))
    x = torch.tensor([prompts[0]])
    ids = generate(model, x, 20, temperature=0)[0, x.size(1):].tolist()
    assert texts(whole)[0] == tok.decode(ids[:ids.index(tok.eot_token)] if tok.eot_token in ids else ids)
    for e in (cached_engine, both_engine):  # the second round reused two 64-token blocks of each prompt
        hits = e.metrics.prefix_hits._value.get()
        assert hits >= 8 * 128, hits


def test_a_row_that_breaks_the_batch_fails_alone(tmp_path, tok, monkeypatch):  # noqa: F811
    """A row whose settings the batched draw cannot take (here a logit_bias id outside the vocabulary,
    past the API's checks) and a decode step that runs out of memory: only the culprit (the newest row, for memory)
    ends in an error; every other row's greedy text equals decode.generate's."""
    model = make_run(str(tmp_path), tok, "modern", n_layer=2, n_embd=64)
    groups = [(tok.encode(p), serve.Sampling(0.0 if i % 4 else 1.0, None, 1.0, 16, i, None, []))
              for i, p in enumerate(PROMPTS)]
    groups[5] = (groups[5][0], serve.Sampling(0.7, 2 ** 70, 1.0, 16, 5, None, [], logit_bias={10 ** 6: 1.0}))
    _, got = engine_run(model, tok, groups)
    assert "error" in got[5][1] and all("error" not in got[i][1] for i in range(16) if i != 5)
    for i in range(1, 16):
        if i % 4 and i != 5:
            assert got[i][0] == greedy(model, tok, PROMPTS[i], 16), i

    real, steps = model.hidden_states, []

    def once_out_of_memory(idx, cache=None):  # the third decode step (of 15 or 16 rows) runs out of memory
        steps.append(idx.size(0) >= 15 and idx.size(1) == 1)
        if sum(steps) == 3 and steps[-1]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(idx, cache)
    monkeypatch.setattr(model, "hidden_states", once_out_of_memory)
    groups = [(tok.encode(p), serve.Sampling(0.0, None, 1.0, 16, None, None, [])) for p in PROMPTS]
    _, got = engine_run(model, tok, groups)
    failed = [i for i in range(16) if "error" in got[i][1]]
    assert len(failed) == 1 and "out of memory" in got[failed[0]][1]["error"]
    monkeypatch.setattr(model, "hidden_states", real)
    for i in set(range(16)) - set(failed):
        assert got[i][0] == greedy(model, tok, PROMPTS[i], 16), i


def test_a_hostile_top_k_among_sixteen_clients(small):
    """The request that once made the batched step raise and failed 14 of 16 neighbours: now a 400."""
    c = small.client()
    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        good = [pool.submit(lambda p=p: c.completions.create(model="out-prod", prompt=p, max_tokens=24))
                for p in PROMPTS]
        bad = pool.submit(httpx.post, small.url + "/v1/completions", timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "out-prod", "prompt": "x", "top_k": 9223372036854775808})
        assert bad.result().status_code == 400 and bad.result().json()["error"]["param"] == "top_k"
        assert all(len(f.result().choices) == 1 for f in good)


def test_metrics_the_dashboard_queries_all_exist(small):
    small.client().completions.create(model="out-prod", prompt="import os\n" * 20, max_tokens=4)
    text = httpx.get(small.url + "/metrics", timeout=10).text
    have = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M))
    dash = json.load(open(os.path.join(ROOT, "static", "grafana_dashboard.json")))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    words = {w for e in exprs for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e)}
    queried = {w for w in words if w.startswith(("vllm:", "model_", "http_"))}
    assert len(queried) >= 10 and queried <= have, queried - have


def test_request_log_rotates_keeps_no_key_and_eval_reads_it(small, workdir):
    c = small.client()
    for p in PROMPTS[:12]:
        c.completions.create(model="out-prod", prompt=p, max_tokens=8, temperature=0)
    c.chat.completions.create(model="out-prod", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    log = workdir / "requests.jsonl"
    assert (workdir / "requests.jsonl.1").exists() and log.stat().st_size <= 4200  # rotated at 4 KB
    rows = [json.loads(line) for f in (workdir / "requests.jsonl.1", log) for line in open(f)]
    assert {"prompt", "completion", "settings", "prompt_tokens", "completion_tokens", "seconds",
            "prompt_bits_per_byte", "mean_logprob", "repetition", "finish_reason"} <= set(rows[-1])
    assert rows[-1]["endpoint"] == "chat" and any(r["prompt"] == PROMPTS[11] for r in rows)
    for f in (log, workdir / "requests.jsonl.1"):
        assert KEY not in f.read_text()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model=out-prod", "--task=ppl",
                        f"--data={log}", "--text_field=prompt", "--device=cpu", "--out=eval_log.json"],
                       cwd=workdir, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.load(open(workdir / "eval_log.json"))["results"]


def test_health_says_when_the_device_has_failed(small, workdir, tok):  # noqa: F811
    from starlette.testclient import TestClient
    model = make_run(str(workdir / "out-health"), tok, "gpt2")
    engine = serve.Engine(model, tok, 4, 4, serve.Metrics())
    app = serve.build_app(serve.Service(model, tok, "m", engine), engine.metrics)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        engine.broken = "AcceleratorError: CUDA error: an illegal memory access was encountered"
        r = client.get("/health")
        assert r.status_code == 503 and "illegal memory access" in r.json()["error"]
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"


def rss_kb(pid):
    return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))


def test_hostile_clients_and_load(small):
    """A fuzzer from the OpenAPI schema, a 50 MB body, a 10^6-character prompt, 500 connections that send
    nothing, 1,000 requests of one token, then memory after 2,000 mixed requests within 10% of memory
    after the first 200. The server answers a normal request correctly after each."""
    import hypothesis
    import schemathesis
    auth = {"Authorization": f"Bearer {KEY}"}
    normal = dict(model="out-prod", prompt="def ", max_tokens=6, temperature=0)
    want = small.client().completions.create(**normal).choices[0].text

    def still_right():
        assert small.client().completions.create(**normal).choices[0].text == want

    schema = schemathesis.openapi.from_url(small.url + "/openapi.json")
    for path in ("/v1/completions", "/v1/chat/completions"):
        @hypothesis.settings(max_examples=60, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=schema[path]["POST"].as_strategy())
        def fuzz(case):
            r = case.call(headers=auth, timeout=30)
            assert r.status_code < 500, (case.body, r.status_code, r.text[:300])
        fuzz()
    still_right()

    r = httpx.post(small.url + "/v1/completions", content=b"{" + b" " * (50 * 2 ** 20) + b"}", timeout=60,
                   headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413
    t0 = time.monotonic()
    r = httpx.post(small.url + "/v1/completions", json={**normal, "prompt": "x" * 10 ** 6}, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 5
    host, port = small.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(500)]
    try:
        still_right()
    finally:
        for s in idle:
            s.close()

    def one(i):
        kind = i % 4  # a mix: short, streamed, chat, a few tokens with a penalty
        if kind == 1:
            return sum(1 for _ in small.client().completions.create(**{**normal, "stream": True}))
        if kind == 2:
            return small.client().chat.completions.create(
                model="out-prod", messages=[{"role": "user", "content": PROMPTS[i % 16]}], max_tokens=3)
        return small.client().completions.create(model="out-prod", prompt=PROMPTS[i % 16], max_tokens=1 + kind,
                                                 presence_penalty=0.5 * kind)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ones = list(pool.map(lambda i: small.client().completions.create(
            model="out-prod", prompt=PROMPTS[i % 16], max_tokens=1).usage.completion_tokens, range(1000)))
        assert ones == [1] * 1000
        list(pool.map(one, range(200)))
        first = rss_kb(small.p.pid)
        list(pool.map(one, range(200, 2000)))
        last = rss_kb(small.p.pid)
    assert last <= 1.1 * first, (first, last)
    still_right()

"""serve.py as its users meet it: the real `openai` client against a server on a free 127.0.0.1 port,
and the batched decoding underneath proved equal to decode.generate.

The models are random GPTs with large weights, saved as checkpoints with the tiny corpus's tokenizer:
a few steps of training leave a model whose greedy output is one token repeated, and equality between
such outputs proves nothing; these models' greedy continuations differ per prompt and per position,
so a wrong position, mask or cache row changes them. Every wait polls with a deadline."""
import base64
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import ENV, ROOT
from decode import generate
from test_model import MODEL_VARIANTS

KEY = "test-key"
PROMPTS = ["def ", "import os\n", "class A:", "    return ", "# the", "x = [", "if __name__", "\n\n",
           "for i in range(", "print(", "self.", "raise ", "try:\n    ", "with open(", "lambda x:", "yield "]


def make_run(out, tok, preset, n_layer=2, n_embd=32, block_size=256, **switches):
    """A checkpoint of a random GPT whose greedy continuations depend on the whole context."""
    from checkpoint import VERSION
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig.preset(preset, n_layer=n_layer, n_head=n_embd // 16, n_embd=n_embd, block_size=block_size,
                              vocab_size=tok.vocab_size, **{"tie_weights": False, **switches})
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # large weights: logits units apart, so float noise never flips an argmax
                p.normal_(0, 0.5 if "wte" in name or "wpe" in name else 1.7 / n_embd ** 0.5)
    os.makedirs(out, exist_ok=True)
    torch.save({"version": VERSION, "model": model.state_dict(), "model_args": dataclasses.asdict(config),
                "tokenizer": tok.dumps(), "iter_num": 0}, os.path.join(out, "ckpt_000000.pt"))
    return model.eval()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The in-process models run on one thread, as the servers (conftest.ENV): on 2 shared cores a
    second thread only waits for the first."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(workdir):
    from bpe import Tokenizer
    return Tokenizer.load(str(workdir / "data" / "tiny" / "tokenizer.bpe"))


@pytest.fixture(scope="module")
def run_dir(workdir, tok):
    # 1,000 positions, ~1 ms a token: a long request runs long enough to leave or to SIGTERM midway
    make_run(str(workdir / "out-serve"), tok, "modern", n_layer=4, n_embd=128, block_size=1024)
    return workdir / "out-serve"


class Server:
    """python serve.py in a subprocess on a free port (--port=0: the server prints the one it got)."""

    def __init__(self, cwd, *args):
        self.p = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--port=0", *args], cwd=cwd,
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err = []
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()
        self.url = None

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.p.poll() is None:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", "".join(self.err))
            if found:
                self.url = found.group(1)
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"serve.py did not start (rc {self.p.poll()}):\n{''.join(self.err)[-3000:]}")

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metrics(self):
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z0-9_:]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                raise


@pytest.fixture(scope="module")
def servers(workdir, run_dir):
    """main: API key, 16 rows. small: one row, one waiting place (for 503 and freed slots)."""
    main = Server(workdir, "--model=out-serve", f"--api_key={KEY}")
    small = Server(workdir, "--model=out-serve", "--max_batch=1", "--max_queue=1")
    try:
        yield main.wait_ready(), small.wait_ready()
    finally:
        main.stop()
        small.stop()


def greedy(model, tok, prompt, n):
    """What decode.generate gives for prompt, as text, stopping at <|endoftext|> as the server does."""
    x = torch.tensor([tok.encode(prompt)])
    ids = generate(model, x, n, temperature=0, eos_token=tok.eot_token)[0, x.size(1):].tolist()
    return tok.decode(ids[:ids.index(tok.eot_token)] if tok.eot_token in ids else ids)


# ---- the engine itself, in-process ----------------------------------------------------------------

def run_engine(model, tok, ptdtype=torch.float32):
    """16 prompts of different lengths decode together, each at its own position; every 4th row
    samples, with its own seed. Returns {row: text} and {row: its last event}."""
    import serve
    engine = serve.Engine(model, tok, 16, 64, serve.Metrics(), "cpu", ptdtype)
    events, lengths = {}, [30 - i for i in range(16)]  # rows finish at different steps and leave
    groups = []
    for i, prompt in enumerate(PROMPTS):
        sampled = i % 4 == 3
        s = serve.Sampling(1.0 if sampled else 0.0, None, 1.0, lengths[i], i, None, [])
        groups.append(serve.Group(tok.encode(prompt), [serve.Sequence(i, s, lambda ev: events.setdefault(
            ev["index"], []).append(ev), time.monotonic(), "cpu")]))
    engine.thread.start()
    engine.submit(groups)
    deadline = time.monotonic() + 60
    while sum(1 for evs in events.values() if "error" in evs[-1] or evs[-1]["finish_reason"]) < 16 \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    return {i: "".join(ev.get("text", "") for ev in evs) for i, evs in events.items()}, \
        {i: evs[-1] for i, evs in events.items()}, lengths


@pytest.mark.parametrize("config", [*MODEL_VARIANTS, {"name": "modern", "quantize": "int8"},
                                    {"name": "modern", "quantize": "int4"}], ids=str)
def test_batched_decoding_equals_generate_per_prompt(tmp_path, tok, config):
    """Every model a GPTConfig describes (test_model.MODEL_VARIANTS: a new switch joins by itself), int8
    and int4: each greedy row, decoded beside 15 others at other lengths and beside sampled rows, equals
    decode.generate on its prompt alone."""
    from quantize import quantize
    switches = {k: v for k, v in config.items() if k not in ("name", "quantize")}
    model = quantize(make_run(str(tmp_path), tok, config["name"], **{"tie_weights": True, **switches}),
                     config.get("quantize", "none"), group_size=32)
    texts, last, lengths = run_engine(model, tok)
    assert all(ev.get("finish_reason") in ("length", "stop") for ev in last.values()), last
    want = {i: greedy(model, tok, PROMPTS[i], lengths[i]) for i in range(16) if i % 4 != 3}
    assert {i: texts[i] for i in want} == want
    varied = [t for t in want.values() if len(set(t)) > 3]  # not vacuous: (nearly) every row its own text
    assert len(set(varied)) == len(varied) >= len(want) - 1


@pytest.mark.parametrize("config", MODEL_VARIANTS, ids=str)
def test_batched_decoding_under_bf16_autocast_serves_every_row(tmp_path, tok, config, monkeypatch):
    """Under CUDA's autocast a QK-normed key comes out of rms_norm in float32 while values are bf16: the
    cache must hold each in its own dtype, and no row may end in an error. CPU autocast leaves rms_norm
    in bf16, so rms_norm is made to follow CUDA's rule here. (bf16 text may depend on the batch's shape,
    so only float32 is compared with decode.generate.)"""
    import torch.nn.functional as F
    rms_norm = F.rms_norm

    def as_on_cuda(x, shape, weight=None, eps=None):  # autocast's fp32 list on CUDA has rms_norm
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return rms_norm(x.float(), shape, None if weight is None else weight.float(), eps)
        return rms_norm(x, shape, weight, eps)

    monkeypatch.setattr(F, "rms_norm", as_on_cuda)
    switches = {k: v for k, v in config.items() if k != "name"}
    model = make_run(str(tmp_path), tok, config["name"], **{"tie_weights": True, **switches})
    texts, last, _ = run_engine(model, tok, torch.bfloat16)
    assert len(last) == 16 and all(ev.get("finish_reason") in ("length", "stop") for ev in last.values()), last
    assert sum(bool(t) for t in texts.values()) >= 12  # rows generated text (a few may end at once)


def test_int8_is_smaller_close_to_float32_and_the_same_for_a_row_alone_or_batched(tok):
    from model import GPT, GPTConfig
    from quantize import Int8Linear, quantize, weight_bytes
    torch.manual_seed(0)  # GPT-2's own initialisation; the gpt2 preset has biases, which stay float32
    model = GPT(GPTConfig.preset("gpt2", n_layer=2, n_head=8, n_embd=128, block_size=64, vocab_size=512)).eval()
    q = quantize(model)
    assert isinstance(q.lm_head, Int8Linear) and isinstance(model.lm_head, torch.nn.Linear)  # a copy
    # the blocks' Linear weights take 1 byte instead of 4 (the tied head adds an int8 copy of wte's table)
    assert weight_bytes(q) < 0.5 * weight_bytes(model)
    x = torch.tensor([tok.encode("def f(x):\n    return x + 1\n")])
    ref, got = model(x)[0], q(x)[0]
    assert (got - ref).norm() / ref.norm() < 0.05 and (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    # each row is quantized on its own scale: its result is bit for bit the same beside any other rows
    layer, rows = q.transformer.h[0].mlp.c_fc, torch.randn(3, 128)
    assert torch.equal(layer(rows), layer(torch.cat([rows, 100 * torch.randn(5, 128)]))[:3])


def test_text_stream_holds_split_characters_and_stop_strings():
    """Bytes arrive one at a time: no broken character is ever sent, nor any part of a stop string."""
    from serve import TextStream
    text = "héllo ✓ 😀 wörld STOP after"
    s, sent = TextStream(["STOP", "wörlx"]), []
    for b in text.encode():
        out, stopped = s.push(bytes([b]))
        sent.append(out)
        if stopped:
            break
    assert "".join(sent) == "héllo ✓ 😀 wörld " and stopped and "\ufffd" not in "".join(sent)
    assert all(not x.endswith(("S", "ST", "w", "wö")) for x in sent[:-1])  # held until it could not be a stop
    s = TextStream(["END"])
    assert s.push("ab EN".encode()) == ("ab ", False) and s.push(b"", final=True) == ("EN", False)


# ---- over HTTP, with the openai client -------------------------------------------------------------

def test_completion_equals_generate_with_usage(servers, run_dir, tok):
    from checkpoint import load_model
    main, _ = servers
    model, _, _ = load_model(str(run_dir))
    c = main.client()
    assert [m.id for m in c.models.list().data] == ["out-serve"]
    r = c.completions.create(model="out-serve", prompt="def ", max_tokens=20, temperature=0, logprobs=2)
    assert r.choices[0].text == greedy(model, tok, "def ", 20)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tok.encode("def ")) and r.usage.completion_tokens == 20
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 20 and all(len(top) == 2 for top in lp.top_logprobs)
    # greedy: each chosen token is the likeliest, so its logprob is the best of the alternatives
    assert all(v == pytest.approx(max(top.values())) and v < 0 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    # a prompt of token ids, and scoring a prompt (echo, max_tokens=0: lm-evaluation-harness's request)
    ids = tok.encode("def ")
    assert c.completions.create(model="out-serve", prompt=ids, max_tokens=20, temperature=0).choices[0].text == \
        r.choices[0].text
    e = c.completions.create(model="out-serve", prompt="import os", max_tokens=0, echo=True, logprobs=0)
    assert e.choices[0].text == "import os" and e.choices[0].logprobs.token_logprobs[0] is None
    full = model(torch.tensor([tok.encode("import os")]))[0][0].log_softmax(-1)
    want = [full[i, t].item() for i, t in enumerate(tok.encode("import os")[1:])]
    assert e.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)


def test_stream_joins_to_the_same_text_for_the_same_seed(servers):
    main, _ = servers
    c = main.client()
    args = dict(model="out-serve", prompt="class A:", max_tokens=40, temperature=1.0, top_p=0.9, seed=7,
                extra_body={"top_k": 50})  # top_k: our extension, as vLLM's
    whole = c.completions.create(**args).choices[0]
    chunks = list(c.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.text
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-2])  # then the reason, then usage
    assert chunks[-2].choices[0].text == "" and chunks[-2].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    other = c.completions.create(**{**args, "seed": 8}).choices[0].text
    assert other != whole.text  # the seed decides


def test_chat_stop_strings_and_n(servers, tok):
    main, _ = servers
    c = main.client()
    # the chat template is a plain transcript: the same text as a completion of that transcript
    transcript = "<|endoftext|>You are terse.\n\nUser: hi\nAssistant:"
    plain = c.completions.create(model="out-serve", prompt=transcript, max_tokens=30, temperature=0,
                                 stop=["\nUser:"]).choices[0].text
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="out-serve", messages=msgs, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == plain and r.choices[0].message.role == "assistant"
    streamed = list(c.chat.completions.create(model="out-serve", messages=msgs, max_tokens=30, temperature=0,
                                              stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == plain
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # a stop string cuts exactly before itself, whichever token it starts in
    text = c.completions.create(model="out-serve", prompt="x = [", max_tokens=30, temperature=0).choices[0].text
    stop = text[11:14]
    cut = c.completions.create(model="out-serve", prompt="x = [", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    # n: the choices are numbered, sampled independently, and all counted in usage
    n = c.completions.create(model="out-serve", prompt="def ", max_tokens=10, n=3, seed=1)
    assert [ch.index for ch in n.choices] == [0, 1, 2] and len({ch.text for ch in n.choices}) == 3
    assert n.usage.completion_tokens == 30


def test_sixteen_concurrent_greedy_requests_equal_each_alone(servers):
    """Batched together, each request gets exactly the text it gets alone (and alone, the server gives
    decode.generate's text: the two tests above)."""
    main, _ = servers
    c = main.client()

    def ask(prompt):
        return c.completions.create(model="out-serve", prompt=prompt, max_tokens=48, temperature=0).choices[0].text

    alone = [ask(p) for p in PROMPTS]
    before = main.metrics()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert together == alone and len(set(alone)) == 16
    after = main.metrics()
    # they shared forward passes: some decode steps ran more than 8 rows at once
    wide = lambda m: m["batch_size_count"] - m['batch_size_bucket{le="8.0"}']  # noqa: E731
    assert wide(after) - wide(before) > 0


def test_errors_have_statuses_and_openai_bodies(servers):
    main, _ = servers
    c = main.client()
    cases = [  # (request, status, param or code the body names)
        (dict(model="nope", prompt="x"), 404, "model_not_found"),
        (dict(model="out-serve", prompt="x", max_tokens=0), 400, "max_tokens"),
        (dict(model="out-serve", prompt="x", max_tokens=1024), 400, "context_length_exceeded"),
        (dict(model="out-serve", prompt="x " * 1100, max_tokens=1), 400, "context_length_exceeded"),
        (dict(model="out-serve", prompt="x", n=17), 400, "n"),
        (dict(model="out-serve", prompt="x", temperature=-1), 400, "temperature"),
        (dict(model="out-serve", prompt="x", top_p=0), 400, "top_p"),
        (dict(model="out-serve", prompt="x", extra_body={"top_k": 0}), 400, "top_k"),
        (dict(model="out-serve", prompt="x", extra_body={"max_tokens": "5"}), 400, "max_tokens"),  # wrong type
        (dict(model="out-serve", prompt=[10 ** 6]), 400, "prompt"),
        (dict(model="out-serve", prompt="x", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ]
    for kwargs, status, named in cases:
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(**kwargs)
        err = e.value.response.json()["error"]
        assert e.value.status_code == status and set(err) == {"message", "type", "param", "code"}, err
        assert named in (err["param"], err["code"]) and err["type"] == "invalid_request_error", (kwargs, err)
    bad = httpx.post(main.url + "/v1/completions", content=b'{"model": ', timeout=10,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = httpx.get(main.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    assert c.completions.create(model="out-serve", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_api_key_is_required_on_the_api_only(servers):
    main, _ = servers
    with pytest.raises(openai.AuthenticationError) as e:
        main.client(key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(main.url + "/v1/completions", json={"model": "out-serve", "prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(main.url + "/health", timeout=10).json()["status"] == "ok"
    assert "<title>" in httpx.get(main.url + "/", timeout=10).text


def test_metrics_counters_move(servers):
    main, _ = servers
    before = main.metrics()
    main.client().completions.create(model="out-serve", prompt="def ", max_tokens=5, temperature=0)
    after = main.metrics()
    moved = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
    assert moved('http_requests_total{route="/v1/completions",status="200"}') == 1
    assert moved("vllm:generation_tokens_total") == 5 and moved("vllm:prompt_tokens_total") == 2
    assert moved("vllm:time_to_first_token_seconds_count") == 1 and moved("vllm:e2e_request_latency_seconds_count") == 1
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    # the model's health: the prompt's surprise, the response's mean log-probability and repetition, its end
    assert moved("model_prompt_bits_per_byte_count") == 1 and after["model_prompt_bits_per_byte_sum"] > 0
    assert moved("model_response_mean_logprob_count") == 1 and moved("model_response_repetition_count") == 1
    assert moved('model_finish_total{cause="length"}') + moved('model_finish_total{cause="eos"}') == 1
    assert after["generation_tokens_per_second"] > 0


def wait_metric(server, key, value, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metrics().get(key, 0) == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{key} never reached {value}: {server.metrics().get(key)}")


def test_disconnect_frees_the_slot_and_a_full_queue_is_503(servers):
    """One row, one waiting place: a client that leaves mid-stream, or stops waiting for a whole
    answer, frees the row at the next step; with the row busy and the place taken, the next is 503."""
    _, small = servers
    body = {"model": "out-serve", "prompt": "def ", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    aborts = small.metrics().get('vllm:request_success_total{finished_reason="abort"}', 0)
    with httpx.Client(base_url=small.url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:  # streamed: leaves after one chunk
            next(r.iter_lines())  # (the dropped iterator closes the connection at once)
    with pytest.raises(httpx.ReadTimeout):  # not streamed: gives up after 0.1 s
        httpx.post(small.url + "/v1/completions", json={**body, "stream": False}, timeout=0.1)
    wait_metric(small, 'vllm:request_success_total{finished_reason="abort"}', aborts + 2)
    assert small.metrics()["vllm:num_requests_running"] == 0
    with httpx.Client(base_url=small.url, timeout=30) as a, httpx.Client(base_url=small.url, timeout=30) as b:
        with a.stream("POST", "/v1/completions", json=body) as r:  # takes the row
            lines = r.iter_lines()  # kept: a dropped iterator would close the connection
            next(lines)
            waiting = threading.Thread(target=lambda: b.post("/v1/completions", json={**body, "stream": False,
                                                                                  "max_tokens": 5}))
            waiting.start()  # takes the waiting place
            wait_metric(small, "vllm:num_requests_waiting", 1)
            full = httpx.post(small.url + "/v1/completions", json=body, timeout=10)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "queue_full"
        waiting.join(timeout=30)
    wait_metric(small, 'vllm:request_success_total{finished_reason="abort"}', aborts + 3)
    r = small.client().completions.create(model="out-serve", prompt="x", max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(workdir, run_dir):
    server = Server(workdir, "--model=out-serve", "--drain_seconds=0.3").wait_ready()
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "out-serve", "prompt": "def ", "max_tokens": 1000, "stream": True,
                            "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if not lines:
                server.p.send_signal(signal.SIGTERM)
            lines.append(line)
    events = [x for x in lines if x.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
    assert server.p.wait(timeout=30) == 0
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(server.url + "/health", timeout=2)
    assert "Traceback" not in "".join(server.err) and "SIGTERM" in "".join(server.err)


def test_bad_settings_are_one_line_errors(workdir, run_dir):
    import socket
    from conftest import error_line
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cases = [(["--model=out-serve", "--quantize=int3"], "quantize='int3' is not one of 'none', 'int8', 'int4', "
                                                         "'int4-gptq'"),
             (["--model=out-serve", "--quantize=int4-gptq"], "make the model with eval.py --quantize=int4-gptq"),
             (["--model=nope"], "no model at 'nope'"),
             (["--model=out-serve", "--draft=out-serve"], "serve.py does not decode speculatively"),
             (["--model=out-serve", f"--port={busy.getsockname()[1]}"], "another server may be there")]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *args], cwd=workdir, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for p, (_, message) in zip(procs, cases):
        out, err = p.communicate(timeout=60)
        p.stderr = err
        assert message in error_line(p) and out == ""
    busy.close()


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe (the DevTools protocol as NUL-separated JSON:
    commands into its fd 3, replies from its fd 4), so the test needs no driver package."""

    def __init__(self, browser, profile):
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.p = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', browser, "--headless",
                                   "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                                   "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1000,720",
                                   "about:blank"], pass_fds=(cmd_r, out_w),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self.buf, self.n = b"", 0

    def send(self, method, session=None, timeout=30, **params):
        import json
        import select
        self.n += 1
        os.write(self.cmd_w, json.dumps({"id": self.n, "method": method, "params": params,
                                         **({"sessionId": session} if session else {})}).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buf:
                if not select.select([self.out_r], [], [], max(0, deadline - time.monotonic()))[0]:
                    raise AssertionError(f"chromium did not answer {method} in {timeout} s")
                chunk = os.read(self.out_r, 1 << 20)
                assert chunk, f"chromium exited ({self.p.poll()})"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.n:  # skip the events
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def close(self):
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(timeout=10)
        if self.p.poll() is None:
            self.p.kill()
        os.close(self.cmd_w)
        os.close(self.out_r)


def test_playground_streams_in_headless_chromium(servers, tmp_path):
    """The page at / streams a completion in a real browser: the text it shows is the API's."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    main, _ = servers
    want = main.client().completions.create(model="out-serve", prompt="def ", max_tokens=30, temperature=0)
    chrome = Chromium(browser, tmp_path / "profile")
    try:
        target = chrome.send("Target.createTarget", url=f"{main.url}/?run=1&prompt=def%20&temperature=0"
                                                        f"&max_tokens=30&api_key={KEY}")["targetId"]
        session = chrome.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        js = lambda expr: chrome.send("Runtime.evaluate", session, expression=expr,  # noqa: E731
                                      returnByValue=True)["result"].get("value")
        deadline = time.monotonic() + 30
        while js("document.body && document.body.dataset.done") != "1" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert js("document.getElementById('completion').textContent") == want.choices[0].text
        assert js("document.getElementById('status').textContent").startswith("done: finish_reason length, 30 tokens")
        shot = tmp_path / "playground.png"
        shot.write_bytes(base64.b64decode(chrome.send("Page.captureScreenshot", session)["data"]))
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    finally:
        chrome.close()

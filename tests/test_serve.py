"""`python -m gym_core.serve` as users run it: a real server process on 127.0.0.1 with
tiny-model variants of every kind, queried with the official `openai` client. Each
variant's greedy answer must be its merged model's (base + dequantized delta, or peft's
merge_and_unload of the adapter)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serve_helpers import (
    PROMPTS,
    ServerProcess,
    greedy_text,
    http,
    make_run,
    merged_model,
    model_cfg,
)

# eight variants of the tiny base: four BitDelta, two DeltaQuant, two LoRA adapters
KINDS = {"bd0": ("bitdelta", {}), "bd1": ("bitdelta", {}), "bd2": ("bitdelta", {}),
         "bd3": ("bitdelta", {}),
         "dq4": ("deltaquant", {"bits": 4, "granularity": "group", "group_size": 32}),
         "dq2": ("deltaquant", {"bits": 2, "granularity": "channel"}),
         "lora0": ("lora", {}), "lora1": ("lora", {})}
MAX = 12  # completion tokens in the comparisons


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve") / "runs"
    for seed, (name, (kind, quant)) in enumerate(KINDS.items()):
        make_run(root, name, kind, seed + 1, **quant)
    return root


@pytest.fixture(scope="module")
def expected(runs):
    """Greedy answers of every merged variant (and the base) to every prompt."""
    from gym_core.model.policy import load_base
    from tests.serve_helpers import model_cfg

    out = {}
    base, tok = load_base(model_cfg())
    out["tiny"] = {p: greedy_text(base, tok, p, MAX) for p in PROMPTS}
    for name in KINDS:
        model, tok = merged_model(runs / name)
        out[name] = {p: greedy_text(model, tok, p, MAX) for p in PROMPTS}
    # the test has power only if the variants answer differently
    assert len({json.dumps(v) for v in out.values()}) == len(out)
    return out


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """The second folder the server may load variants from (--variant-dirs)."""
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def server(runs, uploads, tmp_path_factory):
    srv = ServerProcess(["--base", "tiny", "--variants", str(runs),
                         "--variant-dirs", str(runs), str(uploads)],
                        cwd=tmp_path_factory.mktemp("cwd"))
    assert srv.url, srv.output
    yield srv
    code = srv.stop()
    assert code == 0, srv.output  # SIGTERM is a clean stop
    assert "gym serve: stopped" in srv.output


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def ask(client, model, prompt, **kw):
    kw = {"temperature": 0, "max_tokens": MAX, **kw}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       **kw)
    return r.choices[0].message.content


def test_models_lists_the_base_and_every_variant(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny" and sorted(ids[1:]) == sorted(KINDS)
    assert client.models.retrieve("bd0").id == "bd0"
    # every card says which base model it sits on (gym_core.eval checks it)
    cards = [m.to_dict() for m in client.models.list()]
    assert all(c["base"] == cards[0]["base"] for c in cards)
    assert cards[0]["base"]["identity"] == {"source": "tiny", "tiny": dict(
        model_cfg().tiny)} and cards[0]["base"]["digest"].startswith("sha256:")


@pytest.mark.parametrize("model", ["tiny", *KINDS])
def test_greedy_chat_is_the_merged_models_answer(client, expected, model):
    for prompt in PROMPTS:
        assert ask(client, model, prompt) == expected[model][prompt], (model, prompt)


def test_streamed_chunks_concatenate_to_the_answer(client, expected):
    stream = client.chat.completions.create(
        model="bd1", temperature=0, max_tokens=MAX, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": PROMPTS[0]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["bd1"][PROMPTS[0]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
    assert len([c for c in chunks if c.choices]) > 3  # really streamed, not one blob


def test_text_completions(client, runs):
    from tests.serve_helpers import greedy

    model, tok = merged_model(runs / "lora1")
    ids = tok("Once upon a time", add_special_tokens=False).input_ids
    want = greedy(model, tok, ids, MAX)
    want = tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True)
    r = client.completions.create(model="lora1", prompt="Once upon a time", temperature=0,
                                  max_tokens=MAX)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids)


def test_sampling_parameters(client):
    kw = {"temperature": 0.9, "top_p": 0.8, "max_tokens": 20}
    a = ask(client, "bd2", PROMPTS[1], seed=7, **kw)
    assert a == ask(client, "bd2", PROMPTS[1], seed=7, **kw)  # seeded: reproducible
    assert a != ask(client, "bd2", PROMPTS[1], seed=8, **kw)
    r = client.chat.completions.create(model="bd2", n=3, seed=1, messages=[
        {"role": "user", "content": PROMPTS[1]}], **kw)
    assert len(r.choices) == 3 and len({c.message.content for c in r.choices}) == 3
    # a stop string ends the answer before it
    full = ask(client, "bd2", PROMPTS[1], max_tokens=20)
    stop = full[5:7]
    cut = ask(client, "bd2", PROMPTS[1], max_tokens=20, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, server, expected):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "no-such-model", "hi")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "bd0", "x" * 2000)  # the tiny model's context is 1024 tokens
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="bd0", messages=[{"role": "user", "content": "hi"}],
                                       temperature="hot")
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="bd0", messages="hi")
    status, body = http("POST", f"{server.url}/v1/chat/completions", raw=b'{"model": "bd0", ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert ask(client, "bd0", PROMPTS[0]) == expected["bd0"][PROMPTS[0]]


def wait_idle(server, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = http("GET", f"{server.url}/health")[1]
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"rows still running: {h}")


def test_a_client_leaving_mid_stream_frees_its_row(client, server, expected):
    before = http("GET", f"{server.url}/health")[1]["tokens"]
    stream = client.chat.completions.create(
        model="bd3", temperature=0.8, max_tokens=800, stream=True,
        messages=[{"role": "user", "content": "Tell me a long story."}])
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    h = wait_idle(server)
    assert h["tokens"] - before < 400  # it stopped long before its 800 tokens
    assert ask(client, "bd3", PROMPTS[2]) == expected["bd3"][PROMPTS[2]]


def test_32_concurrent_clients_over_8_variants(client, server, expected):
    names = list(KINDS)
    jobs = [(names[i % 8], PROMPTS[i % 3]) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: ask(client, *job), jobs))
    wrong = [(m, p) for (m, p), a in zip(jobs, answers) if a != expected[m][p]]
    assert not wrong
    assert http("GET", f"{server.url}/health")[1]["max_running"] >= 8  # batched together


def test_memory_stays_bounded(client, server):
    names = list(KINDS)

    def round_():
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: ask(client, names[i % 8], PROMPTS[i % 3], max_tokens=24),
                          range(32)))

    round_()
    start = server.rss_bytes()
    for _ in range(3):
        round_()
    h = wait_idle(server)
    assert h["kv_cache_bytes"] == 0  # the cache is released when idle
    grew = server.rss_bytes() - start
    assert grew < 32 * 2**20, f"RSS grew by {grew / 2**20:.1f} MiB over 96 requests"


def test_variants_are_added_and_removed_while_serving(client, server, runs, uploads):
    from tests.serve_helpers import greedy_text

    api = f"{server.url}/v1/variants"
    new = make_run(uploads, "fresh", "bitdelta", 99)
    model, tok = merged_model(new)
    status, r = http("POST", api, {"name": "fresh", "path": str(new)})
    assert status == 201, r
    assert r["kind"] == "bitdelta" and r["bytes"] > 0
    assert "fresh" in [m.id for m in client.models.list()]
    assert "fresh" in [v["id"] for v in http("GET", api)[1]["data"]]
    assert ask(client, "fresh", PROMPTS[0]) == greedy_text(model, tok, PROMPTS[0], MAX)
    assert http("POST", api, {"name": "fresh", "path": str(new)})[0] == 409

    # removed while a request runs: that request finishes, new ones get 404
    long_answer = ask(client, "fresh", PROMPTS[1], max_tokens=300)
    got, first = [], threading.Event()

    def stream():
        for c in client.chat.completions.create(
                model="fresh", temperature=0, max_tokens=300, stream=True,
                messages=[{"role": "user", "content": PROMPTS[1]}]):
            if c.choices:
                got.append(c.choices[0].delta.content or "")
                first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    assert http("DELETE", f"{api}/fresh") == (200, {"id": "fresh", "object": "variant",
                                                    "deleted": True})
    t.join(120)
    assert "".join(got) == long_answer
    with pytest.raises(openai.NotFoundError):
        ask(client, "fresh", PROMPTS[0])
    assert http("DELETE", f"{api}/fresh")[0] == 404


def test_bad_variants_are_refused_by_name_and_the_server_goes_on(client, server, uploads,
                                                                 expected):
    api = f"{server.url}/v1/variants"
    tmp_path = uploads / "bad"
    tmp_path.mkdir()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    status, r = http("POST", api, {"name": "corrupt", "path": str(corrupt)})
    assert status == 400 and str(corrupt) in r["error"]["message"], r
    other = make_run(tmp_path, "other", "bitdelta", 5, overrides=["model.tiny.hidden_size=32",
                                                                  "model.tiny.intermediate_size=64"])
    status, r = http("POST", api, {"name": "other", "path": str(other)})
    assert status == 400 and "another base" in r["error"]["message"], r
    # the same delta outside its run (no record): caught by the shapes
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes((other / "delta" / "bitdelta.safetensors").read_bytes())
    status, r = http("POST", api, {"name": "other", "path": str(loose)})
    assert status == 400 and "another model" in r["error"]["message"], r
    reseeded = make_run(tmp_path, "reseeded", "bitdelta", 5, overrides=["model.tiny.seed=3"])
    status, r = http("POST", api, {"name": "reseeded", "path": str(reseeded)})
    assert status == 400 and "seed" in r["error"]["message"], r
    assert ask(client, "bd0", PROMPTS[1]) == expected["bd0"][PROMPTS[1]]


def test_startup_refuses_a_bad_variant_with_exit_2(tmp_path):
    corrupt = tmp_path / "x.safetensors"
    corrupt.write_bytes(b"garbage")
    srv = ServerProcess(["--base", "tiny", "--variants", f"bad={corrupt}"], cwd=tmp_path)
    assert srv.proc.wait(60) == 2 and srv.url is None
    errors = [ln for ln in srv.lines if ln.startswith("gym: error:")]
    assert len(errors) == 1 and str(corrupt) in errors[0], srv.output


# ----------------------------------------------------------------------------------------
# facing a network (issue 28): each attack through the real server
# ----------------------------------------------------------------------------------------


def test_variants_load_only_from_the_folders_named_at_start(server, uploads, tmp_path):
    """Outside --variant-dirs every path gets the same answer, whether it exists, is a
    file, a folder, a symbolic link out of an allowed folder or a ../ escape."""
    api = f"{server.url}/v1/variants"
    elsewhere = make_run(tmp_path, "elsewhere", "bitdelta", 7)  # a real variant, elsewhere
    (uploads / "link").symlink_to(elsewhere)
    answers = [http("POST", api, {"name": "x", "path": path}) for path in (
        "/etc/passwd", "/etc", "/no/such/file.safetensors", str(elsewhere),
        str(uploads / "link"), str(uploads / ".." / ".." / "etc" / "passwd"),
        "../../../../../etc/passwd")]
    assert {a[0] for a in answers} == {403}
    assert len({json.dumps(a[1]) for a in answers}) == 1, answers  # reveals nothing
    assert answers[0][1]["error"]["code"] == "path_not_allowed"
    assert "x" not in http("GET", f"{server.url}/v1/models")[1]["data"]
    (uploads / "link").unlink()


def test_a_crafted_delta_is_refused_even_with_a_recomputed_checksum(server, uploads):
    from safetensors.torch import save_file

    from gym_core.deltas.delta import PackedDelta, load_packed, save_packed

    api = f"{server.url}/v1/variants"
    run = make_run(uploads, "crafted", "bitdelta", 11)
    path = run / "delta" / "bitdelta.safetensors"
    packed = load_packed(path)
    huge = {k: v * 1e30 if v.is_floating_point() else v for k, v in packed.tensors.items()}
    save_packed(PackedDelta(huge, packed.meta, packed.num_params), path)  # checksum matches
    status, r = http("POST", api, {"name": "crafted", "path": str(run)})
    assert status == 400 and "more than 100 times" in r["error"]["message"], r
    # no checksum at all: refused too
    save_file(dict(packed.tensors), str(path), metadata={**packed.meta,
                                                          "num_params": str(packed.num_params)})
    status, r = http("POST", api, {"name": "crafted", "path": str(run)})
    assert status == 400 and "no checksum" in r["error"]["message"], r
    assert "crafted" not in [m["id"] for m in http("GET", f"{server.url}/v1/models")[1]["data"]]


def test_a_non_streamed_client_that_leaves_frees_its_row(client, server, expected):
    import select
    import socket
    from urllib.parse import urlparse

    before = wait_idle(server)["tokens"]
    body = json.dumps({"model": "bd2", "max_tokens": 900, "ignore_eos": True,
                       "temperature": 0.8, "messages": [{"role": "user", "content": "Go on."}]})
    u = urlparse(server.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  f"{body}").encode())
    deadline = time.monotonic() + 60
    while http("GET", f"{server.url}/health")[1]["running"] == 0:
        if select.select([sock], [], [], 0)[0]:
            raise AssertionError(sock.recv(65536).decode())  # answered at once: why
        assert time.monotonic() < deadline, "the request never started"
    sock.close()  # the client gives up before the answer
    h = wait_idle(server)
    assert h["tokens"] - before < 450, h  # stopped long before its 900 tokens
    assert ask(client, "bd2", PROMPTS[0]) == expected["bd2"][PROMPTS[0]]


def test_request_bodies_are_capped_and_long_prompts_do_not_stall_health(server):
    import socket
    from urllib.parse import urlparse

    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n"
                      ).encode())  # a 10 MB prompt announced: refused before it is sent
        head = b""
        while b"request_too_large" not in head:  # the headers and the body may come apart
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
        head = head.decode()
    assert head.startswith("HTTP/1.1 413") and "request_too_large" in head, head
    # a 3 MB prompt (under the cap) is tokenised off the event loop: /health answers
    # while it is in flight
    result = {}

    def big():
        result["answer"] = http("POST", f"{server.url}/v1/completions",
                                {"model": "tiny", "prompt": "x" * (3 * 2**20), "max_tokens": 1})

    t = threading.Thread(target=big)
    t.start()
    slowest = 0.0
    while t.is_alive():
        asked = time.monotonic()
        assert http("GET", f"{server.url}/health", timeout=30)[1]["status"] == "ok"
        slowest = max(slowest, time.monotonic() - asked)
    t.join()
    status, r = result["answer"]
    assert status == 400 and r["error"]["code"] == "context_length_exceeded", r
    assert slowest < 5, slowest


def test_a_server_facing_the_network_needs_a_key_and_hides_its_docs(tmp_path):
    open_ = ServerProcess(["--base", "tiny", "--host", "0.0.0.0"], cwd=tmp_path)
    assert open_.proc.wait(60) == 2 and open_.url is None
    errors = [ln for ln in open_.lines if ln.startswith("gym: error:")]
    assert len(errors) == 1 and "--host 0.0.0.0" in errors[0] and "--api-key" in errors[0]
    assert "Traceback" not in open_.output

    keyed = ServerProcess(["--base", "tiny", "--host", "0.0.0.0", "--api-key", "s3cret"],
                          cwd=tmp_path)
    try:
        url = keyed.url.replace("0.0.0.0", "127.0.0.1")
        for path in ("/docs", "/openapi.json", "/v1/models"):
            status, r = http("GET", url + path)
            assert status == 401 and r["error"]["code"] == "invalid_api_key", (path, r)
        import urllib.request

        req = urllib.request.Request(url + "/openapi.json",
                                     headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=30) as got:
            assert got.status == 200 and "/v1/chat/completions" in json.loads(got.read())["paths"]
        assert http("GET", url + "/health")[0] == 200
    finally:
        assert keyed.stop() == 0, keyed.output

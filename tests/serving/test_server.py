"""`matformer serve` end to end: the real server (uvicorn, in a thread, on a free loopback port)
driven by the official `openai` client and raw HTTP (httpx).

One module-scoped server on a tiny checkpoint (conftest's tiny_lm with distinct widths and
nested heads, a BPE tokenizer, a chat template); the reference outputs come from
`matformer.generate` on a second copy of the checkpoint loaded the library's way, and the chat
prompt from transformers' own `apply_chat_template`.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from matformer.inference.decode import generate
from matformer.io.checkpoint import load_model
from matformer.serving.server import ServerThread, load_state
from tests.serving.conftest import one_torch_thread, write_checkpoint

NAME = "ck"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('roles are system, user or assistant') }}{% endif %}"
            "{{ '[' + m['role'] + '] ' + m['content'] | trim }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
PROMPT = "the quick brown fox"
KEY = "sk-test-key"
CONTEXT = 4096


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, tokenizer, reference model, checkpoint folder)."""
    with one_torch_thread():
        folder = tmp_path_factory.mktemp("serve") / NAME
        tok = write_checkpoint(folder, 300, distinct=True, heads=True,
                               max_position_embeddings=CONTEXT)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                                  "chat_template": TEMPLATE}))
        state = load_state(folder, max_batch=3, slo_ms=1e6)
        ref = load_model(folder).eval()
        with ServerThread(state) as server:
            yield server, tok, ref, folder


def reference(served, ids: list[int], n: int, **width) -> str:
    _, tok, ref, _ = served
    out = generate(ref, ids, n, **width)
    return tok.decode(out.tokens, skip_special_tokens=True), len(out.tokens)


WIDTHS = [(NAME, {}), (f"{NAME}@tier-1", {"tier": 1}), (f"{NAME}@tier-3", {"tier": 3}),
          (f"{NAME}@widths=64,256", {"widths": [64, 256]}),
          (f"{NAME}@tier-1,kv_heads=2", {"tier": 1, "kv_heads": 2})]


def test_models_lists_every_tier_the_mix_plans_and_auto(client) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == NAME
    assert {f"{NAME}@tier-{t}" for t in (1, 2, 3)} | {f"{NAME}@auto"} <= set(ids)
    assert any(i.startswith(f"{NAME}@widths=") for i in ids)
    assert client.models.retrieve(f"{NAME}@tier-2").id == f"{NAME}@tier-2"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_at_each_width_equal_generate(served, client, stream: bool) -> None:
    ids = served[1].encode(PROMPT).ids
    for model, width in WIDTHS:
        want, n = reference(served, ids, 12, **width)
        if stream:
            chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert {c.choices[0].model_extra["width"] for c in chunks if c.choices} == {
                model.replace("kv_heads=2", "layer_kv_heads=2+2")}
            usage = chunks[-1].usage
        else:
            r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                          temperature=0)
            text, usage = r.choices[0].text, r.usage
            assert r.choices[0].finish_reason == ("stop" if n < 12 else "length")
        assert text == want, model
        assert usage.completion_tokens == n and usage.prompt_tokens == len(ids)
        assert sum(usage.model_extra["widths"].values()) == n


def test_the_width_field_and_token_prompts(served, client) -> None:
    ids = served[1].encode(PROMPT).ids
    want, _ = reference(served, ids, 8, tier=2)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0,
                                  extra_body={"width": "tier-2"})
    assert r.choices[0].text == want
    assert r.usage.model_extra["widths"] == {f"{NAME}@tier-2": r.usage.completion_tokens}
    r = client.completions.create(model=NAME, prompt=[PROMPT, "lazy dog"], max_tokens=8,
                                  temperature=0, n=2, extra_body={"width": 2})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == want


@pytest.mark.parametrize("stream", [False, True])
def test_chat_renders_the_tokenizers_template(served, client, stream: bool) -> None:
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "the lazy dog"}]
    hf = PreTrainedTokenizerFast.from_pretrained(str(served[3]))
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want, n = reference(served, ids, 10, tier=1)
    if stream:
        chunks = list(client.chat.completions.create(
            model=f"{NAME}@tier-1", messages=messages, max_tokens=10, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(model=f"{NAME}@tier-1", messages=messages,
                                           max_tokens=10, temperature=0)
        text, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].message.role == "assistant"
    assert text == want
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == n


def test_auto_takes_the_widest_width_under_the_target(served, client) -> None:
    policy = served[0].state.engine.policy
    ids = served[1].encode(PROMPT).ids
    try:
        policy.slo_s = 1e3  # every width is under it: the full width
        r = client.completions.create(model=f"{NAME}@auto", prompt=PROMPT, max_tokens=8,
                                      temperature=0)
        assert r.usage.model_extra["widths"] == {NAME: r.usage.completion_tokens}
        assert r.choices[0].text == reference(served, ids, 8)[0]
        policy.slo_s = 1e-9  # none is: the narrowest (tier 3)
        r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"width": "auto"})
        assert r.usage.model_extra["widths"] == {f"{NAME}@tier-3": r.usage.completion_tokens}
        assert r.choices[0].text == reference(served, ids, 8, tier=3)[0]
    finally:
        policy.slo_s = 1e6
    text = httpx.get(served[0].url + "/metrics", timeout=10).text
    assert f'matformer_width_steps_total{{width="{NAME}@tier-3"}}' in text
    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "queue_depth", "generated_tokens_total", "requests_total"):
        assert f"matformer_{name}" in text


def test_concurrent_requests_each_equal_their_single_request_output(served, client) -> None:
    prompts = [PROMPT, "jumps over the lazy", "dog 14", "the", "fox 3 jumps", "over 21"]
    jobs = [(p, WIDTHS[i % len(WIDTHS)]) for i, p in enumerate(prompts)]
    start = threading.Barrier(len(jobs))

    def one(job):
        prompt, (model, _) = job
        start.wait(10)
        return client.completions.create(model=model, prompt=prompt, max_tokens=10,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    for (prompt, (_, width)), text in zip(jobs, got, strict=True):
        assert text == reference(served, served[1].encode(prompt).ids, 10, **width)[0]


def _wait_idle(url: str) -> dict:
    deadline = time.monotonic() + 20
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health


def _generated(url: str) -> float:
    """matformer_generated_tokens_total, every width."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("matformer_generated_tokens_total"))


def test_a_client_leaving_ends_its_job_only(served, client) -> None:
    url = served[0].url
    n = CONTEXT - 16  # seconds of decoding: a job that ran to the end would show
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
            "stream": True, "ignore_eos": True}
    before = _generated(url)
    with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/completions",
                                                       json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    assert _wait_idle(url)["running"] == 0
    assert _generated(url) - before < n  # the job was dropped, not run to its end
    before = _generated(url)  # a plain (not streamed) request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    assert _wait_idle(url)["running"] == 0
    assert _generated(url) - before < n
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == reference(served, served[1].encode(PROMPT).ids, 4)[0]


def test_stop_strings_end_the_text_before_them(served, client) -> None:
    want, _ = reference(served, served[1].encode(PROMPT).ids, 12, tier=1)
    stop = want[len(want) // 2:len(want) // 2 + 2]
    for stream in (False, True):
        r = client.completions.create(model=f"{NAME}@tier-1", prompt=PROMPT, max_tokens=12,
                                      temperature=0, stop=[stop], stream=stream)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == want[:want.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": NAME}, 400, "prompt"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": 7}, 400, "prompt"),
    ({"model": NAME, "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"model": "other", "prompt": PROMPT}, 404, "model"),
    ({"model": f"{NAME}@tier-9", "prompt": PROMPT}, 400, "model"),
    ({"model": f"{NAME}@size-big", "prompt": PROMPT}, 400, "model"),
    ({"model": f"{NAME}@widths=512,512", "prompt": PROMPT}, 400, "model"),
    ({"model": NAME, "prompt": PROMPT, "width": [1, 2, 3]}, 400, "width"),
    ({"model": NAME, "prompt": PROMPT, "width": True}, 400, "width"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": PROMPT, "n": 10**9}, 400, "n"),
    ({"model": NAME, "prompt": [PROMPT] * 9, "n": 2}, 400, "n"),
    ({"model": NAME, "prompt": ""}, 400, "prompt"),
    ({"model": NAME, "prompt": [5, 99999]}, 400, "prompt"),
    ({"model": NAME, "prompt": PROMPT, "logprobs": 3}, 400, "logprobs"),
    ({"model": NAME, "prompt": PROMPT, "stop": ["a"] * 5}, 400, "stop"),
]
BAD_CHAT = [
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}],
      "max_completion_tokens": 10**6}, 400, "max_tokens"),
]


def test_every_bad_input_is_an_openai_shaped_4xx_and_the_server_goes_on(served, client) -> None:
    url = served[0].url
    with httpx.Client(timeout=30) as http:
        cases = [("/v1/completions", *c) for c in BAD] + [("/v1/chat/completions", *c)
                                                          for c in BAD_CHAT]
        for path, body, status, param in cases:
            r = (http.post(url + path, content=body) if isinstance(body, bytes)
                 else http.post(url + path, json=body))
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["message"] and "\n" not in err["message"] and err["type"], body
            assert err["param"] == param, (body, err)
        r = http.get(url + "/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=CONTEXT + 1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user",
                                                                 "content": "hi"}])
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].text == reference(served, served[1].encode(PROMPT).ids, 3)[0]


def test_an_api_key_is_required_when_set(served) -> None:
    server = served[0]
    server.state.api_key = KEY
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        r = httpx.post(server.url + "/v1/completions", timeout=10,  # no key at all
                       json={"model": NAME, "prompt": PROMPT})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert c.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).usage
    finally:
        server.state.api_key = None


def test_the_cli_refuses_bad_options_in_one_line(run_cli, tmp_path: Path) -> None:
    for argv, needle in [(["--max-batch", "0"], "--max-batch"), (["--slo-ms", "-5"], "--slo-ms"),
                         (["--slo-ms", "nan"], "--slo-ms"), (["--port", "70000"], "--port")]:
        r = run_cli("serve", tmp_path / "none", *argv)
        assert r.code == 2 and needle in r.err and len(r.err.strip().splitlines()) == 1, r
    r = run_cli("serve", tmp_path / "none")
    assert r.code == 2 and "Traceback" not in r.err


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_the_cli_serves_and_shuts_down_gracefully(served, sig: str) -> None:
    """`matformer serve CKPT --port 0` in its own process: SIGINT or SIGTERM while a stream is
    running lets it finish, then the process exits 0."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "matformer.cli", "serve", str(served[3]),
                             "--port", "0", "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", line).group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 60, "temperature": 0,
                "stream": True, "ignore_eos": True}
        texts = []
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions",
                                                           json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    if not texts:
                        proc.send_signal(getattr(signal, sig))
                    texts.append(json.loads(line[6:])["choices"][0])
        assert texts[-1]["finish_reason"] == "length"
        want, _ = reference(served, served[1].encode(PROMPT).ids, 60)
        assert "".join(t["text"] for t in texts) == want
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()

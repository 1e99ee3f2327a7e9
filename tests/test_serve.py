"""`hilt serve` against a live uvicorn server (a subprocess on a free 127.0.0.1 port) with a tiny untrained model:
the official `openai` client for completions and chat, every error status in OpenAI's shape, and the faults
(a client leaving mid-stream, garbage bodies, SIGTERM during a stream)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

from hilt.cli import main
from hilt.data.tokenizer import Tokenizer
from hilt.errors import UserError
from hilt.serve.chat import DEFAULT_TEMPLATE, ChatTemplate
from tests.conftest import REPO, save_untrained_checkpoint

KEY = "test-key-123"
NAME = "tiny"
# a long context, so that a stream can run for seconds (the disconnect, queue and SIGTERM tests need one)
CONTEXT = 1024
LONG = {"max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}


# --- a live server -------------------------------------------------------------------------------------------


def save_tiny_checkpoint(folder: Path) -> str:
    return save_untrained_checkpoint(folder, max_seq_len=CONTEXT)


class Server:
    """`python -m hilt serve ... --port 0` in a subprocess; the URL comes from its first line."""

    def __init__(self, model_path: str, log: Path, *flags: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("HILT_API_KEY", None)
        self.log = log
        self.sigterm_sent = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hilt", "serve", "--model_path", model_path, "--port", "0"]
            + ["--log_level", "warning", *flags],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            cwd=REPO,
            env=env,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while call(self, "GET", "/health")[0] != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the model did not load:\n{log.read_text()}")
            time.sleep(0.2)

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.sigterm_sent = True

    def stop(self) -> int:
        # one SIGTERM only: a second one while the server is still exiting would kill it (-15)
        if self.proc.poll() is None and not self.sigterm_sent:
            self.sigterm()
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.stdout.close()


def call(server, method, path, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.status, dict(response.getheaders()), parsed
    except ConnectionRefusedError:
        return 0, {}, None
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {KEY}"}


def open_stream(server, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **AUTH})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return conn, response


def read_events(response, count: int | None = None) -> list:
    """The first ``count`` data payloads of an SSE response (all, up to [DONE], when None)."""
    events = []
    while count is None or len(events) < count:
        line = response.readline()
        if not line:
            break
        line = line.decode().strip()
        if line == "data: [DONE]":
            events.append("[DONE]")
            break
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


def metric(server, name: str, labels: str = "") -> float:
    _, _, text = call(server, "GET", "/metrics", headers=AUTH)
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    # two slots and two waiting places, so that the queue-full test needs only four streams
    flags = ["--api_key", KEY, "--served_model_name", NAME, "--max_batch", "2", "--max_queue", "2"]
    flags += ["--max_n", "2", "--max_body_bytes", "20000"]
    s = Server(checkpoint, tmp_path_factory.mktemp("log") / "server.log", *flags)
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def tokens(server, text: str) -> list[int]:
    return call(server, "POST", "/tokenize", {"text": text}, AUTH)[2]["tokens"]


# --- the API with the openai client --------------------------------------------------------------------------


def test_health_is_open_and_models_describe_the_model(server, client):
    status, _, body = call(server, "GET", "/health")
    assert status == 200 and body == {"status": "ok", "model": NAME}
    (card,) = client.models.list().data
    assert card.id == NAME and card.owned_by == "hilt"
    extra = card.model_extra
    assert extra["max_model_len"] == CONTEXT
    assert extra["hilt"]["architecture"]["d_model"] == 32 and extra["hilt"]["parameters"] > 1_000_000
    assert client.models.retrieve(NAME).id == NAME


def test_greedy_completion_equals_hilt_generate_streamed_or_not(server, client, checkpoint, capsys):
    prompt = "There was"
    assert (
        main(
            ["generate", "--model_path", checkpoint, "--prompt", prompt, "--max_len", "24"]
            + ["--temperature", "0"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    expected = printed.removeprefix(prompt).removesuffix("\n")
    done = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert done.choices[0].text == expected and expected
    assert done.choices[0].finish_reason == "length"
    n_prompt = len(tokens(server, prompt))
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        n_prompt,
        24,
        n_prompt + 24,
    )
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_n_choices_and_seeds_repeat(server, client):
    def sample(seed):
        out = client.completions.create(
            model=NAME, prompt="Once", max_tokens=12, temperature=0.9, n=2, seed=seed, logprobs=0
        )
        return out, [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first, texts = sample(5)
    again, texts_again = sample(5)
    _, other = sample(6)
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == texts_again and texts[0] != texts[1] and texts != other
    # usage counts every generated token of both choices (the logprobs list one entry per token)
    per_choice = [len(c.logprobs.tokens) for c in first.choices]
    assert per_choice == [12, 12] and first.usage.completion_tokens == 24
    assert first.usage.prompt_tokens == len(tokens(server, "Once"))


def test_a_stop_string_ends_the_text_and_never_reaches_the_stream(server, client):
    full = client.completions.create(model=NAME, prompt="The", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]  # four characters from the middle, across tokens
    cut = full[: full.index(stop)]
    done = client.completions.create(
        model=NAME, prompt="The", max_tokens=30, temperature=0, stop=[stop, "@@@"]
    )
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=NAME, prompt="The", max_tokens=30, temperature=0, stop=stop, stream=True
        )
    ]
    # held back while it could still become the stop string: no piece of it was ever sent
    assert "".join(pieces) == cut


def test_prompt_lists_echo_and_logprobs(server, client):
    out = client.completions.create(
        model=NAME, prompt=["Hello", "World"], max_tokens=5, temperature=0, echo=True, logprobs=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("Hello") and out.choices[1].text.startswith("World")
    lp = out.choices[0].logprobs
    n_prompt = len(tokens(server, "Hello"))  # echo lists the prompt's tokens first
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 5
    generated = zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)
    for token, logprob, top in list(generated)[n_prompt:]:
        assert logprob <= 0 and len(top) == 2
        assert max(top, key=top.get) == token and top[token] == pytest.approx(
            logprob
        )  # greedy picks the top one
    assert out.usage.prompt_tokens == len(tokens(server, "Hello")) + len(tokens(server, "World"))


def test_chat_streamed_and_not(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    done = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    reply = done.choices[0].message
    assert reply.role == "assistant" and reply.content and done.choices[0].finish_reason in ("length", "stop")
    rendered = "<BOS>System: Be brief.\nUser: Hi there\nAssistant:"
    assert done.usage.prompt_tokens == len(tokens(server, rendered))
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.content
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    with_logprobs = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = with_logprobs.choices[0].logprobs.content
    assert "".join(t.token for t in content) == with_logprobs.choices[0].message.content
    assert 0 < len(content) <= with_logprobs.usage.completion_tokens and len(content[0].top_logprobs) == 3


def test_tokenize_detokenize_and_metrics(server, client):
    ids = tokens(server, "To be, or not")
    assert ids == Tokenizer.load().encode("To be, or not")
    status, _, body = call(server, "POST", "/detokenize", {"tokens": ids}, AUTH)
    assert status == 200 and body["text"] == "To be, or not"
    client.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0)
    assert metric(server, "hilt_time_to_first_token_seconds_count") >= 1
    assert metric(server, "hilt_generation_tokens_total") >= 3
    assert metric(server, "hilt_requests_running") == 0


def test_the_playground_is_served_with_its_files(server):
    status, headers, page = call(server, "GET", "/")
    assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert call(server, "GET", asset)[0] == 200
    assert "http" not in re.sub(r"http://www\.w3\.org", "", page)  # nothing loaded from elsewhere


def test_head_answers_wherever_get_does(server):
    for path, headers in [
        ("/", {}),
        ("/health", {}),
        ("/static/app.js", {}),
        ("/v1/models", AUTH),
        (f"/v1/models/{NAME}", AUTH),
        ("/metrics", AUTH),
    ]:
        status, got, body = call(server, "HEAD", path, headers=headers)
        get_status, get_headers, _ = call(server, "GET", path, headers=headers)
        assert (status, get_status, body) == (200, 200, ""), path  # the headers only
        assert got["content-type"] == get_headers["content-type"], path
    assert call(server, "HEAD", "/v1/models")[0] == 401  # HEAD needs the key as GET does


def test_echo_with_logprobs_scores_the_prompt_tokens(server, client, checkpoint):
    from hilt.checkpoint.store import load_model_and_tokenizer

    prompt, new = "To be, or not to be", 6
    ids = tokens(server, prompt)
    n = len(ids)
    done = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=new, temperature=0, echo=True, logprobs=2
    )
    choice, lp = done.choices[0], done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + new
    assert "".join(lp.tokens[:n]) == prompt and "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(n + new)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    # each prompt token's logprob is the model's, at the position before it (the reference model in fp32;
    # the server computes in bf16 where the CPU has it)
    model, _, _ = load_model_and_tokenizer(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).float().log_softmax(-1)[0]  # (T, V)
    for i in range(1, n):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=0.02)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert top == pytest.approx(expected[i - 1].topk(2).values.tolist(), abs=0.02)
    # the engine's first token comes from the same distribution: greedy took its largest logprob
    assert lp.token_logprobs[n] == pytest.approx(expected[n - 1].max().item(), abs=0.02)

    # streamed: the echo chunk carries the prompt's entries, and the chunks add up to the same lists
    chunks = list(
        client.completions.create(
            model=NAME, prompt=prompt, max_tokens=new, temperature=0, echo=True, logprobs=2, stream=True
        )
    )
    first = chunks[0].choices[0]
    assert first.text == prompt and first.logprobs.tokens == lp.tokens[:n]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    logprobs = [v for s in streamed for v in s.token_logprobs]
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    # logprobs=0: the same tokens and logprobs, no alternatives
    zero = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=new, temperature=0, echo=True, logprobs=0
    ).choices[0]
    assert zero.logprobs.tokens == lp.tokens and zero.logprobs.top_logprobs == [None] * (n + new)


def test_chat_logprob_tokens_join_to_the_reply(server, client):
    messages = [{"role": "user", "content": "Who art thou?"}]
    settings = {"model": NAME, "max_tokens": 8, "temperature": 0}
    # the model's own text after the template's "Assistant:" begins with a space, which chat drops
    rendered = "<BOS>User: Who art thou?\nAssistant:"
    role_stops = ["\nSystem:", "\nUser:", "\nAssistant:"]
    raw = client.completions.create(prompt=rendered, stop=role_stops, **settings).choices[0].text
    assert raw.startswith(" ") and raw.strip()
    done = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **settings)
    content = done.choices[0].message.content
    assert content == raw.lstrip()
    entries = done.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == content
    assert all(bytes(e.bytes) == e.token.encode() and len(e.top_logprobs) == 2 for e in entries)
    # a stop string cutting a token in two: the last entry is cut with it
    stop = content[len(content) // 2 : len(content) // 2 + 3]
    cut = client.chat.completions.create(messages=messages, logprobs=True, stop=stop, **settings).choices[0]
    assert cut.message.content == content[: content.index(stop)] and cut.finish_reason == "stop"
    assert "".join(e.token for e in cut.logprobs.content) == cut.message.content
    # streamed: the deltas and the chunks' logprob tokens both join to the same reply
    for extra in ({}, {"stop": stop}):
        chunks = list(
            client.chat.completions.create(messages=messages, logprobs=True, stream=True, **settings, **extra)
        )
        deltas = "".join(c.choices[0].delta.content or "" for c in chunks)
        joined = "".join(
            e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content
        )
        assert deltas == joined == (cut.message.content if extra else content)


def test_token_texts_follow_the_engines_text(checkpoint):
    """Scripted tokens through the real engine (its hold-back for stop strings, its cut, <EOS>): whitespace
    tokens, a character split over two tokens, a stop string that ends inside a token."""
    from hilt.checkpoint.store import load_model_and_tokenizer
    from hilt.generation.engine import Engine, SamplingParams
    from hilt.serve.logprobs import token_texts

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint, torch.device("cpu"))
    engine = Engine(model, tokenizer, max_slots=1).start()
    text = "\n\n\n\n\nIUS: caf\u00e9 \u4e16\u754c\nUser: more"
    # one entry per token of the text; the first half of a character split over two tokens gets ""
    words = ["I", "US", ":", " caf\u00e9", " ", "", "\u4e16", "", "\u754c"]
    spaces = ["\n\n", "\n\n", "\n"]
    try:
        for stop, strip, expected in [
            (["\nUser:"], True, words),  # chat: the leading newlines dropped
            (["\nUser:"], False, spaces + words),
            (["Us"], False, [*spaces, *words, "\n"]),  # a stop string ending inside the token "User"
            ([], True, [*words, "\n", "User", ":", " more"]),  # to <EOS>, which adds no text
        ]:
            script = iter([*tokenizer.encode(text), tokenizer.eos_id])

            def head(hidden, script=script):  # logits that make greedy decoding follow the script
                logits = torch.zeros(hidden.shape[0], tokenizer.vocab_size)
                logits[:, next(script)] = 1.0
                return logits

            engine._head = head
            params = SamplingParams(max_new_tokens=64, temperature=0, stop=stop, logprobs=0)
            outs = list(engine.submit([tokenizer.bos_id], params))
            sent = "".join(o.text for o in outs)
            entries = token_texts(tokenizer, outs, strip_leading=strip)
            assert [t for _, t, _ in entries] == expected
            assert "".join(expected) == (sent.lstrip() if strip else sent)
            assert [offset for _, _, offset in entries] == [
                len("".join(expected[:i])) for i in range(len(expected))
            ]
            assert all(o.logprob is not None and o.token_id is not None for o, _, _ in entries)
    finally:
        engine.shutdown()


# --- errors: OpenAI's shape and status -----------------------------------------------------------------------


def assert_error(response, status: int, param: str | None = None, words: tuple = ()):
    got, headers, body = response
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    for word in words:
        assert word in body["error"]["message"], body["error"]["message"]
    return headers, body["error"]


def test_400_for_malformed_wrong_typed_and_out_of_range_requests(server):
    def post(body=None, raw=None, path="/v1/completions"):
        return call(server, "POST", path, body, AUTH, raw=raw)

    assert_error(post(raw=b'{"prompt": "x",'), 400, words=("not valid JSON",))
    assert_error(post({"prompt": 5}), 400, "prompt")
    assert_error(post({"prompt": "x", "max_tokens": "5"}), 400, "max_tokens")  # strict: a string is no number
    assert_error(post({"prompt": "x", "temperature": 2.5}), 400, "temperature")
    assert_error(post({"prompt": "x", "n": 0}), 400, "n")
    assert_error(post({"prompt": "x", "n": 3}), 400, "n", ("at most 2",))
    assert_error(post({"prompt": "x", "logprobs": 9}), 400, "logprobs")
    assert_error(post({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, "stop", ("at most 4",))
    assert_error(post({"prompt": "x", "frequency_penalty": 0.5}), 400, words=("not supported",))
    assert_error(post({"messages": [{"role": "wizard", "content": "x"}]}, path="/v1/chat/completions"), 400)
    n_prompt = len(tokens(server, "one two three"))
    _, error = assert_error(post({"prompt": "one two three", "max_tokens": CONTEXT}), 400, "max_tokens")
    for number in (CONTEXT, n_prompt, n_prompt + CONTEXT):
        assert str(number) in error["message"]
    assert error["code"] == "context_length_exceeded"


CHAT = "/v1/chat/completions"


def body_for(path: str, **fields) -> dict:
    prompt = (
        {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    )
    return {**prompt, "max_tokens": 2, **fields}


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_stop_string_is_a_400(server, path, stream):
    for stop in ("", ["a", ""]):
        body = body_for(path, stop=stop, stream=stream)
        assert_error(call(server, "POST", path, body, AUTH), 400, "stop", ("non-empty",))
    assert "Traceback" not in server.log.read_text()


def test_the_official_client_gets_a_bad_request_for_an_empty_stop(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, stop="")
    assert caught.value.status_code == 400 and caught.value.body["param"] == "stop"


def test_list_values_name_the_rule_they_break(server):
    def refused(body, param, words, path="/v1/completions"):
        _, error = assert_error(call(server, "POST", path, body, AUTH), 400, param, words)
        assert "valid string" not in error["message"]

    five = ["a", "b", "c", "d", "e"]
    refused({"prompt": "x", "stop": five}, "stop", ("at most 4", "has 5"))
    refused(body_for(CHAT, stop=five), "stop", ("at most 4",), path=CHAT)
    refused({"prompt": "x", "stop": [""]}, "stop", ("non-empty",))
    refused({"prompt": []}, "prompt", ("empty list",))
    refused({"prompt": [464, 2068]}, "prompt", ("token-id prompts are not supported",))
    refused({"prompt": [[464, 2068]]}, "prompt", ("token-id prompts are not supported",))
    status, _, done = call(
        server, "POST", "/v1/completions", body_for("/v1/completions", stop=five[:4]), AUTH
    )
    assert status == 200 and done["usage"]["completion_tokens"] >= 1  # four, the limit, go through


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
def test_a_json_response_format_is_refused_and_text_accepted(server, path):
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        body = body_for(path, response_format=fmt)
        assert_error(
            call(server, "POST", path, body, AUTH), 400, "response_format", (fmt["type"], "not supported")
        )
    status, _, done = call(server, "POST", path, body_for(path, response_format={"type": "text"}), AUTH)
    assert status == 200 and done["usage"]["completion_tokens"] == 2


def test_401_without_the_key_and_the_key_compared_whole(server):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": KEY},
    ):
        headers_back, error = assert_error(call(server, "GET", "/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key" and headers_back["www-authenticate"] == "Bearer"
    assert_error(call(server, "POST", "/tokenize", {"text": "x"}), 401)
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert caught.value.status_code == 401


def test_404_for_an_unknown_model_or_route(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"
    assert_error(call(server, "GET", "/v1/nothing", headers=AUTH), 404)
    assert_error(call(server, "GET", "/v1/models/gpt-4", headers=AUTH), 404, "model")


def test_413_for_an_oversized_body(server):
    big = {"prompt": "a" * 30_000}
    _, error = assert_error(call(server, "POST", "/v1/completions", big, AUTH), 413, words=("20000 bytes",))
    assert error["code"] == "too_large"


def test_503_with_retry_after_when_the_queue_is_full(server):
    # two slots run, two requests wait: the fifth is refused at once, not queued
    streams = []
    try:
        for i in range(4):
            streams.append(open_stream(server, "/v1/completions", {"prompt": "x", **LONG}))
            if i < 2:  # running (the engine admits between steps), so the next one finds the slot taken
                assert read_events(streams[-1][1], 1)[0]["choices"][0]["text"] is not None
        start = time.monotonic()
        headers, error = assert_error(
            call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, AUTH), 503
        )
        assert (
            time.monotonic() - start < 2.0 and headers["retry-after"] == "1" and error["code"] == "queue_full"
        )
    finally:
        for conn, _ in streams:
            conn.close()
    deadline = time.monotonic() + 10
    while metric(server, "hilt_requests_running") + metric(server, "hilt_requests_waiting") > 0:
        assert time.monotonic() < deadline, "the closed streams kept running"
        time.sleep(0.05)


# --- faults --------------------------------------------------------------------------------------------------


def test_a_client_leaving_mid_stream_frees_its_slot_at_once(server):
    label = '{finish_reason="cancelled"}'
    cancelled = metric(server, "hilt_requests_finished_total", label)
    generated = metric(server, "hilt_generation_tokens_total")
    conn, response = open_stream(server, "/v1/completions", {"prompt": "x", **LONG})
    assert len(read_events(response, 3)) == 3
    assert metric(server, "hilt_requests_running") == 1
    conn.close()
    left = time.monotonic()
    while metric(server, "hilt_requests_running") > 0:
        assert time.monotonic() - left < 1.0, "the engine kept decoding for a client that left"
        time.sleep(0.01)
    assert metric(server, "hilt_requests_finished_total", label) == cancelled + 1
    time.sleep(0.2)
    assert metric(server, "hilt_generation_tokens_total") - generated < 500  # of the 1000 asked for


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"null",
        b"[1, 2, 3]",
        b'"a string"',
        b"{" * 5000,
        b'{"prompt": "x", "max_tokens": 1e400}',
        b'{"prompt": "\\ud800", "max_tokens": 1}',
        json.dumps({"prompt": {"nested": [{"deep": None}]}}).encode(),
    ],
)
def test_garbage_bodies_get_400_and_the_server_keeps_serving(server, raw):
    assert_error(call(server, "POST", "/v1/completions", raw=raw, headers=AUTH), 400)
    status, _, body = call(server, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 2}, AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_sigterm_during_a_stream_ends_it_cleanly_and_exits_0(checkpoint, tmp_path):
    # a grace well under the stream's length: 1,000 tokens of the tiny model take only 0.6-1.4 s on a fast CPU,
    # so with a 1 s grace the stream could end by itself first (it did once in CI after decoding got faster)
    s = Server(checkpoint, tmp_path / "server.log", "--shutdown_grace", "0.2")
    conn, response = open_stream(s, "/v1/completions", {"prompt": "x", **LONG})
    assert len(read_events(response, 2)) == 2
    sent = time.monotonic()
    s.sigterm()
    time.sleep(0.3)
    assert call(s, "GET", "/health")[0] in (0, 503)  # no longer accepting work
    rest = read_events(response)
    conn.close()
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "shutting_down"
    assert s.stop() == 0 and time.monotonic() - sent < 8
    assert "Traceback" not in s.log.read_text()


# --- the command and the template, without a server ----------------------------------------------------------


def test_cli_mistakes_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["serve", "--model_path", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for %}")
    assert main(["serve", "--model_path", checkpoint, "--chat_template", str(bad)]) == 2
    assert "not a valid Jinja template" in capsys.readouterr().err
    assert main(["serve", "--model_path", checkpoint, "--max_batch", "0"]) == 2
    assert "--max_batch" in capsys.readouterr().err
    assert main(["serve", "--model_path", checkpoint, "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model_path", checkpoint, "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_the_default_template_and_its_role_stops():
    t = ChatTemplate(DEFAULT_TEMPLATE, "<BOS>", "<EOS>")
    text = t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert text == "<BOS>System: S\nUser: Hi\nAssistant:"
    assert t.stops == ["\nSystem:", "\nUser:", "\nAssistant:"]


def test_a_template_file_as_transformers_stores_it(tmp_path):
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": chatml}))
    t = ChatTemplate.load(path, "<BOS>", "<EOS>")
    assert t.render([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")
    assert "<|im_end|>\n<|im_start|>user" in t.stops
    with pytest.raises(UserError, match="no chat_template"):
        (tmp_path / "empty.json").write_text("{}")
        ChatTemplate.load(tmp_path / "empty.json", "<BOS>", "<EOS>")


# --- the app in this process: loading, timeouts, CORS ----------------------------------------------------------


def test_health_is_503_until_loaded_then_timeouts_and_cors(checkpoint):
    import threading

    import uvicorn

    from hilt.checkpoint.store import load_model_and_tokenizer
    from hilt.generation.engine import Engine
    from hilt.serve.app import AppSettings, Loaded, create_app

    release = threading.Event()

    def load() -> Loaded:
        release.wait(30)
        model, tokenizer, _ = load_model_and_tokenizer(checkpoint, torch.device("cpu"))
        engine = Engine(model, tokenizer, max_slots=2).start()
        return Loaded(engine=engine, tokenizer=tokenizer, info={"max_model_len": CONTEXT})

    settings = AppSettings(served_model_name=NAME, request_timeout=0.5, cors_origins=["https://ok.example"])
    app = create_app(settings, load)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()

        class Here:
            port = sock.getsockname()[1]

        try:
            deadline = time.monotonic() + 10
            while call(Here, "GET", "/health")[0] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            headers, error = assert_error(call(Here, "GET", "/health"), 503)
            assert error["code"] == "model_loading" and int(headers["retry-after"]) > 0
            assert_error(call(Here, "POST", "/v1/completions", {"prompt": "x"}), 503)
            release.set()
            deadline = time.monotonic() + 60
            while call(Here, "GET", "/health")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # a request that runs past --request_timeout: 504, or an error event once a stream has begun
            slow = {"prompt": "x", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
            _, error = assert_error(call(Here, "POST", "/v1/completions", slow), 504)
            assert error["type"] == "timeout_error"
            events = read_events(open_stream(Here, "/v1/completions", {**slow, "stream": True})[1])
            assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout_error"
            # CORS answers only the origins it was given
            allowed = call(Here, "GET", "/health", headers={"Origin": "https://ok.example"})[1]
            other = call(Here, "GET", "/health", headers={"Origin": "https://evil.example"})[1]
            assert allowed.get("access-control-allow-origin") == "https://ok.example"
            assert "access-control-allow-origin" not in other
        finally:
            server.should_exit = True
            thread.join(30)


def test_cors_is_off_by_default(server):
    headers = call(server, "GET", "/health", headers={"Origin": "https://ok.example"})[1]
    assert not any(h.startswith("access-control-") for h in headers)


def test_threads_reaches_the_engines_decode_thread(checkpoint):
    from hilt.serve.run import ServeConfig, load_engine

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the flag has something to change, whatever the machine's default
    try:
        loaded = load_engine(ServeConfig(model_path=checkpoint, threads=1))
        seen = []
        real = loaded.engine._step
        loaded.engine._step = lambda: (seen.append(torch.get_num_threads()), real())
        request = loaded.engine.submit([1, 2, 3], None)
        list(request)
        loaded.engine.shutdown()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}

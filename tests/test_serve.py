"""web_demo.py and api_server.py on tiny models (CPU): the answers of an adapter trained on 16 real MSRA examples,
served to the official openai client and to headless Chromium; bad requests; one generation at a time."""
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import pytest
import torch

from conftest import REPO_ROOT, SHARED, TOKENIZERS, run_script
from utils.distributed import free_port
from utils.generation import GrowingText, StableText, stream_chat_reply
from utils.adapters import load_model_with_adapter
from utils.model_loading import ModelFolderError, load_tokenizer
from utils.prompts import get_prompt_format, user_message
from utils.records import read_instruction_records

ARTIFACTS = REPO_ROOT / "tests" / "artifacts"  # git-ignored; the browser test leaves its screenshot here
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def served(trained_adapter, trainable_models, sixteen_examples):
    """The tiny ChatGLM2 base, the adapter trained on the 16 examples, the model with the adapter (loaded here, as
    the reference) and the examples."""
    base = trainable_models["chatglm2-6b"]
    adapter = trained_adapter("chatglm2-6b") / "adapter_model"
    model, tokenizer = load_model_with_adapter(base, adapter, dtype="fp32", device="cpu")
    return {"base": base, "adapter": adapter, "model": model, "tokenizer": tokenizer,
            "records": read_instruction_records(sixteen_examples)}


def greedy_chat(served, message, history=()):
    """The model's own chat() (its own prompt building) as the reference answer."""
    response, _ = served["model"].chat(served["tokenizer"], message, history=[tuple(t) for t in history], do_sample=False)
    return response


class Server:
    """A script started as a server on a free port of 127.0.0.1; its output goes to a log file."""

    def __init__(self, script, args, log_path, ready_path, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, script, f"--port={self.port}", *args], cwd=REPO_ROOT,
                                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, f"{script} exited:\n{self.log()}"
            try:
                urllib.request.urlopen(self.url + ready_path, timeout=5)
                break
            except urllib.error.HTTPError:
                break  # answering (e.g. 401 without a key)
            except OSError:
                assert time.monotonic() < deadline, f"{script} did not answer within 180 s:\n{self.log()}"
                time.sleep(0.5)

    def log(self):
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def listening_address(port):
    """The local IPv4 address a socket listens on for `port` (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            return ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return None


# ---- the shared pieces ----

def test_stable_text_holds_back_what_post_processing_may_rewrite():
    stable = StableText()
    # ChatGLM-6B's post-processing turns ',' into '，' once a Chinese character follows it.
    pieces = [stable.update(text) for text in ("你", "你好", "你好,", "你好，世")]
    assert pieces == ["", "你", "好", "，"]
    assert stable.update("你好，世界", final=True) == "世界"
    rewritten = StableText()
    rewritten.update("[[训练时")
    assert rewritten.update("2023年", final=True) is None  # what was shown cannot be taken back


@pytest.mark.parametrize("version", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b"])
def test_growing_text_is_the_whole_decode_after_every_token(version):
    """A streamed answer's text grows a token's decode at a time (the servers' readers): after every token it equals
    decoding all the ids so far, up to the last complete character, on real answers (Alpaca-zh, MSRA: spaces, newlines,
    code, emoji) and on ids mostly of single bytes, as random models write them."""
    tokenizer = load_tokenizer(TOKENIZERS / version, version)
    alpaca = json.loads((SHARED / "data" / "alpaca_zh" / "alpaca_zh_demo_llamafactory.json").read_text(encoding="utf-8"))
    texts = [record["output"] for record in alpaca[:40]] + ["  def f(x):\n\treturn x  # 注释\n\n\n😀🎉，!?"]
    texts += [record["answer"] for record in read_instruction_records(SHARED / "data" / "msra" / "instruct_data" / "dev.txt")[:20]]
    id_lists = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    byte_ids = [tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in range(256)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        picks = torch.randint(300, 60000, (60,), generator=generator).tolist()
        bytes_first = torch.randint(0, 256, (60,), generator=generator).tolist()
        id_lists.append([byte_ids[b] if i % 3 else pick for i, (b, pick) in enumerate(zip(bytes_first, picks))])
    checked = 0
    for ids in id_lists:
        growing = GrowingText(tokenizer)
        for end in range(1, len(ids) + 1):
            whole = tokenizer.decode(ids[:end])
            growing.update(ids[:end])
            if not whole.endswith("\ufffd"):
                assert growing.text == whole, (version, ids[:end])
                checked += 1
    assert checked > 3000


@pytest.mark.parametrize("version", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b"])
def test_stream_chat_reply_equals_the_models_chat(version, tiny_model_dirs):
    """The served answer is the model's own chat() answer (same prompt, same post-processing) for every version,
    streamed: every partial text continues into the final one and the settled pieces add up to it."""
    model, tokenizer = load_model_with_adapter(tiny_model_dirs[version], "none", dtype="fp32", device="cpu")
    history = [["你好", "你好，有什么可以帮你？"]]
    prompt_ids = get_prompt_format(tokenizer, version).prompt_ids("北京在哪里?", history)
    replies = list(stream_chat_reply(model, tokenizer, prompt_ids, max_new_tokens=12))
    if version == "chatglm3-6b":  # its chat() takes the history as messages
        native = [{"role": role, "content": text} for turn in history for role, text in zip(("user", "assistant"), turn)]
    else:
        native = [tuple(turn) for turn in history]
    expected, _ = model.chat(tokenizer, "北京在哪里?", history=native, do_sample=False, max_new_tokens=12)
    final = replies[-1]
    assert final.text == expected and final.prompt_tokens == len(prompt_ids)
    assert [r.finish_reason for r in replies[:-1]] == [None] * (len(replies) - 1)
    assert final.finish_reason in ("stop", "length") and 1 <= final.completion_tokens <= 12
    assert (final.finish_reason == "length") == (final.completion_tokens == 12)
    stable = StableText()
    assert "".join(stable.update(r.text, final=r.finish_reason is not None) for r in replies) == final.text


def test_tiny_temperatures_decode_greedily(tiny_model_dirs):
    """A temperature of 1e-300 (valid: above 0) divided the logits into inf and the probabilities into NaN; below
    GREEDY_BELOW_TEMPERATURE sampling is greedy decoding, the same tokens as do_sample=False."""
    model, tokenizer = load_model_with_adapter(tiny_model_dirs["chatglm2-6b"], "none", dtype="fp32", device="cpu")
    prompt_ids = get_prompt_format(tokenizer, "chatglm2-6b").prompt_ids("北京在哪里?", [])
    *_, greedy = stream_chat_reply(model, tokenizer, prompt_ids, max_new_tokens=8)
    for temperature in (1e-300, 5e-324, 1e-6):
        *_, tiny = stream_chat_reply(model, tokenizer, prompt_ids, max_new_tokens=8, do_sample=True, temperature=temperature)
        assert tiny == greedy, temperature
    # The chat scripts' --top_k reaches the sampler: sampling from the top 1 token is greedy at any temperature.
    for seed in range(3):
        torch.manual_seed(seed)
        *_, top_one = stream_chat_reply(model, tokenizer, prompt_ids, max_new_tokens=8, do_sample=True, temperature=2.0,
                                        top_k=1)
        assert top_one == greedy, seed


def test_missing_adapter_is_reported_before_loading(tmp_path, tiny_model_dirs):
    with pytest.raises(ModelFolderError, match="no_adapter: no such folder"):
        load_model_with_adapter(tiny_model_dirs["chatglm2-6b"], tmp_path / "no_adapter")


# ---- api_server.py ----

@pytest.fixture(scope="module")
def api(served, tmp_path_factory):
    log = tmp_path_factory.mktemp("api") / "api_server.log"
    server = Server("api_server.py", [f"--model_dir={served['base']}", f"--lora_path={served['adapter']}", "--model_name=ner",
                                      "--api_key=env:SERVE_TEST_KEY", "--max_input_tokens=1024", "--max_new_tokens=64",
                                      "--max_request_bytes=100000", "--log_level=warning"],
                    log, "/v1/models", env={"SERVE_TEST_KEY": API_KEY})
    yield server
    server.stop()


def test_api_answers_the_openai_client(api, served):
    from openai import OpenAI

    records = served["records"]
    client = OpenAI(base_url=api.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["ner"]
    first = user_message(records[0])
    completion = client.chat.completions.create(model="ner", messages=[{"role": "user", "content": first}], temperature=0)
    assert completion.choices[0].message.content == records[0]["answer"]  # what the adapter was trained to answer
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].message.role == "assistant"
    prompt_tokens = len(get_prompt_format(served["tokenizer"], "chatglm2-6b").prompt_ids(first, []))
    assert completion.usage.prompt_tokens == prompt_tokens and completion.usage.completion_tokens > 1

    # Streaming, with the first turn as history: the pieces add up to the model's own chat() answer.
    second = user_message(records[1])
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": records[0]["answer"]},
                {"role": "user", "content": second}]
    # Token by token, not one block. A reader that falls behind gets the newest text only (utils.scheduler), so on a
    # busy machine a short answer can arrive whole: one of three streams must come in pieces.
    for _ in range(3):
        chunks = list(client.chat.completions.create(model="ner", messages=messages, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        if len(pieces) > 1:
            break
    assert len(pieces) > 1
    assert "".join(pieces) == greedy_chat(served, second, [(first, records[0]["answer"])])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens > 1 and not chunks[-1].choices

    # max_tokens cuts the answer: finish_reason "length" after exactly that many tokens; a system message is put
    # in front of the first user message (ChatGLM2 has no system turn).
    short = client.chat.completions.create(model="ner", messages=[{"role": "system", "content": records[0]["instruct"]},
                                                                  {"role": "user", "content": records[0]["query"]}],
                                           temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert records[0]["answer"].startswith(short.choices[0].message.content)


def test_api_answers_a_tiny_temperature_as_greedy(api, served):
    """"temperature": 1e-300 is valid by the schema (0 to 2); it answered 500 "probability tensor contains inf/nan"."""
    good = {"model": "ner", "messages": [{"role": "user", "content": user_message(served["records"][0])}]}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=api.url, timeout=60, headers=headers) as client:
        for stream in (False, True):
            response = client.post("/v1/chat/completions", json={**good, "temperature": 1e-300, "stream": stream})
            assert response.status_code == 200 and "error" not in response.text, response.text
        response = client.post("/v1/chat/completions", json={**good, "temperature": 1e-300})
        assert response.json()["choices"][0]["message"]["content"] == served["records"][0]["answer"]


def test_api_rejects_bad_requests_with_openai_errors_and_keeps_serving(api, served):
    good = {"model": "ner", "messages": [{"role": "user", "content": user_message(served["records"][0])}], "temperature": 0}
    too_long = "".join(chr(0x4E00 + i) for i in range(3000))
    cases = [  # (body, expected status, expected code, expected param)
        (b'{"model": "ner", "messages": [', 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b"[" * 100_000, 400, "invalid_json", None),  # nested deeper than Python's recursion limit (within 100 kB)
        (b'{"model": "ner", "user": ' + b"1" * 5000 + b"}", 400, "invalid_json", None),  # more digits than int() takes
        # half a UTF-16 surrogate pair: valid JSON, but no character (nothing can encode it as UTF-8)
        (json.dumps({**good, "messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, "invalid_json", None),
        ({**good, "model": "gpt-4o"}, 404, "model_not_found", "model"),
        ({**good, "messages": []}, 400, "invalid_value", "messages"),
        ({"model": "ner"}, 400, "missing_required_parameter", "messages"),
        ({**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages.0.role"),
        ({**good, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value", "messages.0.content"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "invalid_value", "messages.0.content.0.type"),
        ({**good, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value", "messages.0.role"),
        ({**good, "messages": good["messages"] * 2}, 400, "invalid_value", "messages.1.role"),
        ({**good, "messages": [{"role": "user", "content": too_long}]}, 400, "context_length_exceeded", "messages"),
        ({**good, "max_tokens": 65}, 400, "invalid_value", "max_tokens"),
        ({**good, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({**good, "temperature": 3}, 400, "invalid_value", "temperature"),
        ({**good, "stream": "yes"}, 400, "invalid_value", "stream"),
        ({**good, "n": 2}, 400, "invalid_value", "n"),
        ({**good, "seed": 2**63}, 400, "invalid_value", "seed"),  # seeds are 64-bit signed, as OpenAI documents
        ({**good, "seed": 2**64}, 400, "invalid_value", "seed"),  # more than torch.manual_seed takes
        ({**good, "stop": ["\n", ""]}, 400, "invalid_value", "stop"),
        ({**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
        ({**good, "tools": []}, 400, "unsupported_parameter", "tools"),
        ({**good, "messages": [{"role": "user", "content": "x" * 100_001}]}, 413, "request_too_large", None),
    ]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=api.url, timeout=60) as client:
        for body, status, code, param in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = client.post("/v1/chat/completions", content=content, headers=headers)
            assert response.status_code == status, (body if isinstance(body, bytes) else str(body)[:200], response.text)
            error = response.json()["error"]
            assert (error["code"], error["param"]) == (code, param) and error["message"] and error["type"], response.text
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = client.post("/v1/chat/completions", json=good, headers=auth)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/nothing", headers=headers).json()["error"]["code"] == "not_found"
        # Still serving, with the right answer.
        response = client.post("/v1/chat/completions", json=good, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == served["records"][0]["answer"]
    assert api.process.poll() is None
    assert "Traceback" not in api.log_path.read_text(errors="replace")  # all answered as client errors
    assert listening_address(api.port) == "127.0.0.1"  # no --host given: loopback only


def test_api_answers_only_loopback_hosts_and_pages_and_json_bodies(api):
    """Against DNS rebinding (a web page's own name, resolved to 127.0.0.1, arrives as Host) and cross-site requests
    (a web page's browser adds Origin; text/plain goes out without a CORS preflight, JSON does not)."""
    good = {"model": "ner", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 1}
    port = api.port
    with httpx.Client(base_url=api.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        def refused(response, code):
            error = response.json()["error"]
            return response.status_code == 403 and error["code"] == code and error["type"] and error["message"]

        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil.example",
                     "0.0.0.0", f"evil.example@127.0.0.1:{port}", "192.168.1.5"):
            assert refused(client.get("/v1/models", headers={"Host": host}), "host_not_allowed"), host
        assert refused(client.post("/v1/chat/completions", json=good, headers={"Host": "evil.example"}), "host_not_allowed")
        for host in ("localhost", f"LocalHost:{port}", f"127.0.0.1:{port}", "127.1.2.3", f"[::1]:{port}"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host

        for origin in ("http://evil.example", f"http://evil.example:{port}", "https://localhost.evil.example", "null",
                       "file://", "ftp://localhost"):
            assert refused(client.post("/v1/chat/completions", json=good, headers={"Origin": origin}), "origin_not_allowed"), origin
        assert refused(client.get("/v1/models", headers={"Origin": "http://evil.example"}), "origin_not_allowed")
        for origin in ("http://localhost:3000", f"http://127.0.0.1:{port}", "https://[::1]:8080"):
            assert client.get("/v1/models", headers={"Origin": origin}).status_code == 200, origin

        content = json.dumps(good).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            response = client.post("/v1/chat/completions", content=content,
                                   headers={"Content-Type": content_type} if content_type else {})
            assert response.status_code == 415, (content_type, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type"
        response = client.post("/v1/chat/completions", content=content,
                               headers={"Content-Type": "Application/JSON; charset=utf-8", "Origin": "http://localhost:3000"})
        assert response.status_code == 200, response.text


def test_api_host_and_origin_options():
    """--allowed_hosts and --allowed_origins add to the loopback names and pages; a specific --host address is a name
    clients may use; "*" allows any host. The check in front of a stand-in app (the model plays no part)."""
    import api_server
    from fastapi.responses import PlainTextResponse

    async def answered(config, host, origin=None):
        app = api_server.HostAndOriginCheck(PlainTextResponse("ok"), dict(api_server.DEFAULTS, **config))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            response = await client.get("/v1/models", headers={"Host": host, **({"Origin": origin} if origin else {})})
        if response.status_code == 403:
            assert response.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed")
            return False
        assert response.text == "ok"
        return True

    cases = [  # (options, Host, Origin, answered)
        ({}, "api.example", None, False),
        ({"host": "0.0.0.0"}, "192.168.1.5:8000", None, False),  # every interface, but only loopback names by default
        ({"host": "0.0.0.0"}, "localhost:8000", None, True),
        ({"host": "192.168.1.5"}, "192.168.1.5:8000", None, True),  # the address it binds
        ({"host": "192.168.1.5"}, "api.example", None, False),
        ({"host": "0.0.0.0", "allowed_hosts": "api.example, 10.0.0.7"}, "API.example:8000", None, True),
        ({"host": "0.0.0.0", "allowed_hosts": "api.example, 10.0.0.7"}, "10.0.0.7", None, True),
        ({"host": "0.0.0.0", "allowed_hosts": "api.example, 10.0.0.7"}, "www.api.example", None, False),
        ({"allowed_hosts": "api.example"}, "api.example", None, True),  # on loopback behind a proxy
        ({"allowed_hosts": "*"}, "anything.example:1234", None, True),
        ({"allowed_hosts": "*"}, "anything.example", "https://anything.example", False),  # Origin is its own check
        ({"allowed_origins": "https://chat.example"}, "localhost", "https://chat.example", True),
        ({"allowed_origins": "https://chat.example"}, "localhost", "http://chat.example", False),
        ({"allowed_origins": "https://chat.example"}, "localhost", "https://evil.example", False),
    ]
    for options, host, origin, expected in cases:
        assert asyncio.run(answered(options, host, origin)) == expected, (options, host, origin)


def test_host_and_origin_check_closes_websockets_of_other_sites():
    """WebSocket requests get the same check (a browser opens them cross-site without asking): closed with 1008
    (policy violation) before the app sees them."""
    from utils.serving import HostAndOriginCheck

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["type"])

    async def send(message):
        sent.append(message)

    check = HostAndOriginCheck(app, {"host": "127.0.0.1", "allowed_hosts": "", "allowed_origins": ""})
    for headers, allowed in (([(b"host", b"evil.example")], False),
                             ([(b"host", b"localhost:7860"), (b"origin", b"http://evil.example")], False),
                             ([(b"host", b"localhost:7860"), (b"origin", b"http://localhost:7860")], True)):
        reached.clear()
        sent.clear()
        asyncio.run(check({"type": "websocket", "path": "/", "headers": headers}, None, send))
        assert reached == (["websocket"] if allowed else []), headers
        assert sent == [] if allowed else [sent[0]["type"], sent[0]["code"]] == ["websocket.close", 1008], headers


def test_api_server_checks_its_options_before_loading_the_model(monkeypatch, capsys):
    """An --api_key=env:NAME without the variable, or a key that no HTTP client could send (not visible ASCII: a
    header is read as Latin-1 bytes), stops the server before the minutes of loading; a server open to the network
    without a key warns."""
    import api_server
    from utils.config_utils import ConfigError
    from utils.model_loading import ModelFolderError

    loaded = []

    def loader(*args, **kwargs):  # stands in for the load: records it, then stops main() there
        loaded.append(args)
        raise ModelFolderError("stopped at loading")

    monkeypatch.setattr(api_server, "load_run", loader)
    monkeypatch.delenv("SERVE_TEST_UNSET", raising=False)
    monkeypatch.setenv("SERVE_TEST_EMPTY", "")
    monkeypatch.setenv("SERVE_TEST_NEWLINE", "key\n")  # as `export KEY=$(cat file)` does not strip, from some tools
    options = dict(api_server.DEFAULTS, port=free_port())
    for name in ("SERVE_TEST_UNSET", "SERVE_TEST_EMPTY"):
        with pytest.raises(ConfigError, match=f"environment variable {name} is not set or empty"):
            api_server.main(dict(options, api_key=f"env:{name}"))
    for key, wrong in (("ключ-123", "'к'"), ("env:SERVE_TEST_NEWLINE", "'\\n'"), ("two words", "' '")):
        with pytest.raises(ConfigError, match=f"--api_key: .* holds {re.escape(wrong)}; a key may only have visible ASCII"):
            api_server.main(dict(options, api_key=key))
    assert loaded == []

    for host, api_key, warned in (("0.0.0.0", "", True), ("0.0.0.0", "a-key", False), ("127.0.0.1", "", False),
                                  ("localhost", "", False)):
        with pytest.raises(ModelFolderError, match="stopped at loading"):
            api_server.main(dict(options, host=host, api_key=api_key))
        err = capsys.readouterr().err
        assert ("WARNING" in err and f"--host={host}" in err and "--api_key" in err) == warned, (host, api_key, err)


def test_servers_and_chat_report_bad_options_and_folders_in_one_error_line(tmp_path, tiny_model_dirs):
    """Each in one line that starts with `error:`, exit status 1, no traceback, before the model loads: a missing
    model folder or adapter was printed without `error:`; a bad dtype, port or host was a traceback after loading."""
    missing = tmp_path / "no_model"
    tiny = tiny_model_dirs["chatglm2-6b"]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [  # (script, args, the message after "error: ")
        ("web_demo.py", [f"--model_dir={missing}"], f"--model_dir={missing}: no such folder"),
        ("chat_ner.py", [f"--model_dir={missing}", "--lora_path=none"], f"--model_dir={missing}: no such folder"),
        ("api_server.py", [f"--model_dir={missing}"], f"--model_dir={missing}: no such folder"),
        ("web_demo.py", [f"--model_dir={tiny}", f"--lora_path={tmp_path}"], f"--lora_path={tmp_path}: an empty folder"),
        ("web_demo.py", [f"--model_dir={tiny}", "--dtype=fp8"], "--dtype: 'fp8' is not a dtype"),
        ("chat_ner.py", [f"--model_dir={tiny}", "--lora_path=none", "--device=gpu"], "--device: 'gpu' is not a device"),
        ("web_demo.py", [f"--model_dir={tiny}", "--port=99999"], "--port: 99999 is not a TCP port"),
        ("web_demo.py", [f"--model_dir={tiny}", f"--port={busy.getsockname()[1]}"], "--host=127.0.0.1 --port="),
        ("api_server.py", [f"--model_dir={missing}", "--host=no-such-host.invalid"], "--host: 'no-such-host.invalid'"),
        ("api_server.py", [f"--model_dir={missing}", "--api_key=ключ"], "--api_key: the key holds 'к'"),
        ("api_server.py", [f"--model_dir={missing}", "--max_waiting=-1"], "--max_waiting: -1; use 0 or more"),
        ("api_server.py", [f"--model_dir={missing}", "--max_batch=0"], "--max_batch: 0; use 1 or more"),
        # the KV cache of the running batch, checked against free memory once the model has loaded
        ("api_server.py", [f"--model_dir={tiny}", "--max_batch=1000000000000"], "--max_batch=1000000000000: the KV cache"),
        ("api_server.py", [f"--model_dir={missing}", "--log_level=loud"], "--log_level: 'loud'"),
    ]
    try:
        for script, args, message in cases:
            result = run_script(script, *args, check=False, timeout=120)
            output = result.stdout + result.stderr
            assert result.returncode == 1 and "Traceback" not in output, (script, args, output[-2000:])
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), (script, args, result.stderr[-2000:])
    finally:
        busy.close()


def wait_until(condition, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_api_drops_requests_whose_client_left(tiny_model_dirs):
    """Over real HTTP (uvicorn in a thread, so that the test can hold the decode steps): with the batch's only row
    taken, requests whose clients disconnect while they wait leave the line at once and are never prefilled; a
    streaming client that leaves mid-answer frees its row for the next request."""
    import uvicorn

    import api_server

    model, tokenizer = load_model_with_adapter(tiny_model_dirs["chatglm2-6b"], "none", dtype="fp32", device="cpu")
    app = api_server.create_app(model, tokenizer, dict(api_server.DEFAULTS, model_dir="tiny", max_new_tokens=64,
                                                       max_batch=1, max_waiting=4))
    scheduler = app.state.scheduler
    prefilled, admit, run_step, permits = [], scheduler.rows.admit, scheduler.run_step, threading.Semaphore(0)
    scheduler.rows.admit = lambda row, prompts: (prefilled.extend(prompts), admit(row, prompts))[1]
    scheduler.run_step = lambda bucket, tokens: (permits.acquire(timeout=120), run_step(bucket, tokens))[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 64, "temperature": 0}

    def send_and_leave_open(request):
        data = json.dumps(request).encode()
        sock = socket.create_connection(("127.0.0.1", server.config.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        return sock

    try:
        wait_until(lambda: server.started, "uvicorn started")
        streaming = send_and_leave_open({**body, "stream": True})
        wait_until(lambda: scheduler.running, "the streaming request holds the row")  # its steps wait for permits
        abandoned = [send_and_leave_open({**body, "stream": stream}) for stream in (False, True)]
        wait_until(lambda: len(scheduler.waiting) == 2, "two requests wait")
        for sock in abandoned:
            sock.close()
        wait_until(lambda: not scheduler.waiting, "the requests whose clients left no longer wait")
        permits.release(3)
        streaming.close()  # mid-answer
        permits.release(1000)
        wait_until(lambda: not scheduler.running, "the row is free again")
        assert httpx.post(url, json={**body, "max_tokens": 4}, timeout=120).status_code == 200  # still serving
        assert len(prefilled) == 2  # the streaming request and the last: the abandoned ones never ran
    finally:
        permits.release(1000)
        server.should_exit = True
        thread.join(timeout=30)


# ---- web_demo.py ----

def states_of(action):
    """Every state a page action (an async generator, as Gradio runs it) yields, on an event loop of its own."""
    async def read():
        return [state async for state in action]

    return asyncio.run(read())


def test_web_chat_streams_keeps_history_and_regenerates(served):
    import web_demo

    records = served["records"]
    warnings = []
    chat = web_demo.WebChat(served["model"], served["tokenizer"], warn=warnings.append)
    sampling = (64, 0.8, 0.8, False)  # max new tokens, top_p, temperature, greedy
    first = user_message(records[0])
    states = states_of(chat.submit(first, [], *sampling))
    answers = [history[-1][1] for _, history, _ in states]
    assert answers[0] == "" and answers[-1] == records[0]["answer"]
    assert len(set(answers)) >= 3 and all(records[0]["answer"].startswith(a) for a in answers)  # grows token by token
    chatbot, history, textbox = states[-1]
    assert textbox == "" and chatbot == [{"role": "user", "content": first}, {"role": "assistant", "content": answers[-1]}]
    second = user_message(records[1])
    *_, (chatbot, history, _) = states_of(chat.submit(second, history, *sampling))
    assert history == [[first, records[0]["answer"]], [second, greedy_chat(served, second, [(first, records[0]["answer"])])]]
    *_, (chatbot, regenerated) = states_of(chat.regenerate(history, *sampling))
    assert regenerated == history and len(chatbot) == 4
    # A conversation longer than the prompt budget loses its oldest turns, with a warning.
    short = web_demo.WebChat(served["model"], served["tokenizer"], config=dict(max_input_tokens=len(
        get_prompt_format(served["tokenizer"], "chatglm2-6b").prompt_ids(second, [])) + 5), warn=warnings.append)
    *_, (_, shortened, _) = states_of(short.submit(second, history, *sampling))
    assert shortened[-1] == [second, records[1]["answer"]] and len(shortened) == 3 and "oldest turns" in warnings[-1]


@pytest.fixture(scope="module")
def web_demo(served, tmp_path_factory):
    """web_demo.py serving the adapter greedily on a free port of 127.0.0.1."""
    server = Server("web_demo.py", [f"--model_dir={served['base']}", f"--lora_path={served['adapter']}", "--do_sample=false",
                                    "--max_new_tokens=64"], tmp_path_factory.mktemp("web_demo") / "web_demo.log", "/")
    yield server
    server.stop()


def test_web_demo_answers_only_loopback_hosts_and_pages(web_demo, served):
    """The API's Host/Origin rules on the page's HTTP endpoints: a web page of another site (DNS rebinding: its own
    name as Host; a cross-site request: its Origin) gets 403 and cannot join the queue; the page and its queue work
    for a loopback browser (the official gradio client drives a whole answer)."""
    from gradio_client import Client

    port = web_demo.port
    join = {"data": ["你好", 8, 0.8, 0.8, False], "fn_index": 0, "session_hash": "evil", "event_data": None}
    with httpx.Client(base_url=web_demo.url, timeout=60) as client:
        for headers in ({"Host": "evil.example", "Origin": "http://evil.example"}, {"Host": f"evil.example:{port}"},
                        {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Host": "localhost.evil.example"}):
            for method, path in (("GET", "/"), ("GET", "/config"), ("POST", "/gradio_api/queue/join")):
                response = client.request(method, path, json=join if method == "POST" else None, headers=headers)
                assert response.status_code == 403, (headers, path, response.status_code, response.text[:300])
                assert response.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed")
        for headers in ({}, {"Host": f"localhost:{port}"}, {"Origin": f"http://127.0.0.1:{port}"}, {"Host": "[::1]"}):
            assert client.get("/", headers=headers).status_code == 200, headers
    records = served["records"]
    chatbot, textbox = Client(web_demo.url, verbose=False).predict(user_message(records[0]), 64, 0.8, 0.8, False,
                                                                   api_name="/submit")
    assert chatbot[-1]["content"][0]["text"] == records[0]["answer"] and textbox == ""
    assert "Traceback" not in web_demo.log()


def test_web_demo_warns_when_open_to_the_network(tmp_path, capsys):
    """The page has no password: a non-loopback --host warns at start (before the model loads)."""
    import web_demo
    from utils.model_loading import ModelFolderError

    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)):
        with pytest.raises(ModelFolderError, match="config.json: not found"):  # the folder: after the options
            web_demo.main(dict(web_demo.DEFAULTS, host=host, port=free_port(), model_dir=str(tmp_path)))
        err = capsys.readouterr().err
        assert ("WARNING" in err and f"--host={host}" in err and "no password" in err) == warned, (host, err)


def test_web_demo_in_headless_chromium(web_demo, served):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium, see README): no browser to drive")
    from playwright.sync_api import expect, sync_playwright

    records = served["records"]
    first, second = user_message(records[0]), user_message(records[1])
    second_answer = greedy_chat(served, second, [(first, records[0]["answer"])])
    assert listening_address(web_demo.port) == "127.0.0.1"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(web_demo.url)
        bot = page.locator('#chat [data-testid="bot"]')
        question = page.locator("#question textarea")
        question.fill(first)
        question.press("Enter")
        expect(bot.nth(0)).to_have_text(records[0]["answer"], timeout=120_000)
        question.fill(second)
        page.locator("#send").click()
        expect(bot.nth(1)).to_have_text(second_answer, timeout=120_000)  # answered with the first turn as history
        expect(page.locator('#chat [data-testid="user"]')).to_have_count(2)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        screenshot = ARTIFACTS / "web_demo.png"
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"screenshot: {screenshot}")
        page.locator("#regenerate").click()
        expect(bot).to_have_count(2)
        expect(bot.nth(1)).to_have_text(second_answer, timeout=120_000)  # greedy: the same answer again
        page.locator("#clear").click()
        expect(bot).to_have_count(0)
        question.fill(second)
        question.press("Enter")  # after Clear the history is empty: the second question alone
        expect(bot.nth(0)).to_have_text(records[1]["answer"], timeout=120_000)
        browser.close()
    assert screenshot.stat().st_size > 10_000

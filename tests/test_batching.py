"""Concurrent requests decoded together (utils.scheduler): answers equal to the same request served alone on every kind
of model, requests joining and leaving mid-batch, a cancelled request freeing its row at the next token, per-request
budgets, stop texts and sampling, 429 past --max_waiting, the KV-memory check; the API and the web page on that path."""
import asyncio
import json
import logging
import re
import threading

import httpx
import pytest
import torch

from conftest import REPO_ROOT, TOKENIZERS
from tools.tiny_models import make_tiny_glm4, make_tiny_model
from utils.config_utils import ConfigError
from utils.adapters import load_model_with_adapter
from utils.model_loading import load_model_and_tokenizer
from utils.prompts import get_prompt_format, user_message
from utils.records import read_instruction_records
from utils.scheduler import Sampling, Scheduler
from utils.serving import check_kv_memory

DEMO_DEV = REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "dev.txt"


def prompts_of(tokenizer, model, records):
    prompt_format = get_prompt_format(tokenizer, getattr(model, "model_version", None))
    return [prompt_format.prompt_ids(user_message(record), []) for record in records], prompt_format.stop_token_ids


def answer(request):
    *_, ids = request.new_ids()
    return ids


def record_steps(scheduler):
    """The running rows of every decode step (the scheduler's own run_step, wrapped on this instance)."""
    rows, run_step = [], scheduler.run_step

    def recorded(bucket, tokens):
        rows.append(len(scheduler.running))
        return run_step(bucket, tokens)

    scheduler.run_step = recorded
    return rows


def gate_steps(scheduler):
    """Each decode step waits for a permit of the returned semaphore."""
    permits, run_step = threading.Semaphore(0), scheduler.run_step

    def gated(bucket, tokens):
        assert permits.acquire(timeout=120), "the test never let the step run"
        return run_step(bucket, tokens)

    scheduler.run_step = gated
    return permits


def count_shifts(rows):
    shifts, shift = [], rows.shift
    rows.shift = lambda offset: (shifts.append(offset), shift(offset))
    return shifts


@pytest.fixture(scope="module")
def learnt(trained_adapter, trainable_models, sixteen_examples):
    """A tiny ChatGLM2 with the adapter trained on 16 MSRA examples (it answers them as learnt), and the examples."""
    adapter = trained_adapter("chatglm2-6b") / "adapter_model"
    model, tokenizer = load_model_with_adapter(trainable_models["chatglm2-6b"], adapter, dtype="fp32", device="cpu")
    return model, tokenizer, read_instruction_records(sixteen_examples)


def model_kinds(tiny_model_dirs, tmp_path):
    """Every kind of model the servers load, tiny: ChatGLM-6B/2/3, a P-tuning prefix, int4, GLM-4 (both layouts)."""
    kinds = {version: load_model_and_tokenizer(folder, dtype="fp32", device="cpu") for version, folder in tiny_model_dirs.items()}
    prefix_dir = make_tiny_model("chatglm2-6b", tmp_path / "prefix", TOKENIZERS / "chatglm2-6b", pre_seq_len=8)
    kinds["prefix"] = load_model_and_tokenizer(prefix_dir, dtype="fp32", device="cpu")
    int4, tokenizer = load_model_and_tokenizer(tiny_model_dirs["chatglm2-6b"], dtype="fp32", device="cpu")
    kinds["int4"] = (int4.quantize(4), tokenizer)
    texts = [user_message(record) for record in read_instruction_records(DEMO_DEV)]
    for layout in ("glm", "glm4"):
        kinds[layout] = load_model_and_tokenizer(make_tiny_glm4(tmp_path / layout, texts, model_type=layout))
    return kinds


def test_batched_answers_equal_alone_on_every_kind_of_model(tiny_model_dirs, tmp_path):
    """Eight requests through four rows, the buffer short enough that the rows move left: each answer equals the
    same request run alone, id for id (fp32 on the CPU), on every kind of model."""
    for kind, (model, tokenizer) in model_kinds(tiny_model_dirs, tmp_path).items():
        prompts, stop_ids = prompts_of(tokenizer, model, read_instruction_records(DEMO_DEV)[:8])
        budgets = [12, 30, 7, 24, 30, 5, 18, 30]
        row_tokens = max(map(len, prompts)) + 30
        scheduler = Scheduler(model, stop_ids, max_batch=4, max_waiting=8, row_tokens=row_tokens)
        alone = [answer(scheduler.submit(prompt, budget)) for prompt, budget in zip(prompts, budgets)]
        shifts, rows = count_shifts(scheduler.rows), record_steps(scheduler)
        together = [answer(request) for request in [scheduler.submit(p, b) for p, b in zip(prompts, budgets)]]
        scheduler.close()
        assert together == alone, kind
        assert all(len(ids) == budget or ids[-1] in stop_ids for ids, budget in zip(alone, budgets)), kind
        assert max(rows) == 4 and any(offset < 0 for offset in shifts), (kind, rows, shifts)


def test_requests_join_and_leave_a_running_batch(learnt):
    """Requests that arrive while others generate join at a token boundary, finished ones leave, and every answer
    equals its answer alone (and what the model learnt)."""
    model, tokenizer, records = learnt
    prompts, stop_ids = prompts_of(tokenizer, model, records[:6])
    scheduler = Scheduler(model, stop_ids, max_batch=3, max_waiting=8, row_tokens=160)
    alone = [answer(scheduler.submit(prompt, 40)) for prompt in prompts]
    rows = record_steps(scheduler)
    permits = gate_steps(scheduler)
    first = scheduler.submit(prompts[0], 40)
    updates = first.new_ids()
    permits.release()  # one step: the first request is decoding (2 of its tokens), whatever the threads' timing
    next(updates)
    later = [scheduler.submit(prompt, 40) for prompt in prompts[1:]]
    permits.release(10_000)
    answers = [list(updates)[-1]] + [answer(request) for request in later]
    scheduler.close()
    assert answers == alone
    assert rows[0] == 1 and 3 in rows and rows[-1] == 1, rows  # alone, then joined by others, then alone again
    assert [tokenizer.decode(ids[:-1]) for ids in alone] == [record["answer"] for record in records[:6]]


def test_a_cancelled_request_frees_its_row_at_the_next_token(learnt):
    model, tokenizer, records = learnt
    prompts, stop_ids = prompts_of(tokenizer, model, records[:2])
    scheduler = Scheduler(model, stop_ids, max_batch=1, max_waiting=1, row_tokens=200)
    permits = gate_steps(scheduler)
    running = scheduler.submit(prompts[0], 100)
    updates = running.new_ids()
    assert len(next(updates)) == 1  # its first token, from the prefill
    waiting = scheduler.submit(prompts[1], 8)
    permits.release()
    assert len(next(updates)) == 2
    running.cancel()
    permits.release(100)
    assert list(updates) == [] or len(list(updates)) <= 1  # at most the token of the step already under way
    assert len(running.ids) <= 3 and len(answer(waiting)) >= 1  # the waiting request got the row
    scheduler.close()


def test_each_request_keeps_its_own_sampling_in_a_mixed_batch(learnt):
    """Greedy and sampled requests in one batch: the greedy ones equal their answers alone, a seeded sampled one
    equals the same seed alone (its own random stream), whatever runs beside it."""
    model, tokenizer, records = learnt
    prompts, stop_ids = prompts_of(tokenizer, model, records[:4])
    scheduler = Scheduler(model, stop_ids, max_batch=4, max_waiting=4, row_tokens=160)
    samplings = [Sampling(), Sampling(do_sample=True, temperature=1.5, top_p=0.95, seed=7), Sampling(),
                 Sampling(do_sample=True, temperature=1.5, top_k=50, seed=8)]
    alone = [answer(scheduler.submit(prompt, 30, sampling)) for prompt, sampling in zip(prompts, samplings)]
    rows = record_steps(scheduler)
    with scheduler.changed:  # all four join at the same token boundary
        requests = [scheduler.submit(prompt, 30, sampling) for prompt, sampling in zip(prompts, samplings)]
    assert [answer(request) for request in requests] == alone and max(rows) == 4
    greedy = answer(scheduler.submit(prompts[1], 30))
    scheduler.close()
    assert alone[1] != greedy  # the sampled answer is not the greedy one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the queued-ahead step and its CUDA graphs need CUDA")
def test_on_cuda_the_queued_ahead_batch_answers_as_each_request_alone(trained_adapter, trainable_models, sixteen_examples):
    """On CUDA each step is queued before its tokens are read: requests joining and leaving mid-batch (the buffer
    short enough that the rows move left), greedy and seeded sampled ones, still get their answers alone, the greedy
    ones what the model learnt, through the captured steps of every bucket."""
    adapter = trained_adapter("chatglm2-6b") / "adapter_model"
    model, tokenizer = load_model_with_adapter(trainable_models["chatglm2-6b"], adapter, dtype="fp32", device="cuda")
    records = read_instruction_records(sixteen_examples)[:6]
    prompts, stop_ids = prompts_of(tokenizer, model, records)
    samplings = [Sampling(), Sampling(do_sample=True, temperature=1.5, top_p=0.95, seed=7)] + [Sampling()] * 4
    budgets = [32, 32, 3, 32, 1, 32]
    scheduler = Scheduler(model, stop_ids, max_batch=4, max_waiting=8, row_tokens=max(map(len, prompts)) + 32)
    assert scheduler.mode == "graph" and scheduler.queue_ahead
    alone = [answer(scheduler.submit(p, b, s)) for p, b, s in zip(prompts, budgets, samplings)]
    shifts, rows = count_shifts(scheduler.rows), record_steps(scheduler)
    with scheduler.changed:
        first = [scheduler.submit(p, b, s) for p, b, s in zip(prompts[:2], budgets, samplings)]
    updates = first[0].new_ids()
    next(updates), next(updates)  # decoding
    order = [2, 3, 4, 5, 1, 2, 3, 4, 5]  # the sampled request again: the batch runs long enough to reach the end
    later = [scheduler.submit(prompts[i], budgets[i], samplings[i]) for i in order]
    together = [list(updates)[-1]] + [answer(request) for request in first[1:] + later]
    scheduler.close()
    assert together == alone[:2] + [alone[i] for i in order]
    assert 4 in rows and any(offset < 0 for offset in shifts), (rows, shifts)
    assert [len(ids) for ids in alone[2::2]] == [3, 1] and all(len(ids) <= b for ids, b in zip(alone, budgets))
    assert [tokenizer.decode(alone[i][:-1]) for i in (0, 3, 5)] == [records[i]["answer"] for i in (0, 3, 5)]


def test_the_kv_cache_must_fit_in_free_memory(learnt):
    model, _, _ = learnt
    check_kv_memory(model, 4, 256)
    with pytest.raises(ConfigError, match=r"--max_batch=1000000000: the KV cache of 1000000000 requests of 2560 tokens "
                                          r".* GiB is free on cpu; the largest batch that fits is \d+"):
        check_kv_memory(model, 10**9, 2560)


# ---- the servers on that path ----

def post_all(app, bodies, new_threads=None):
    """The responses to `bodies` sent at once; `new_threads` gets the names of the threads started meanwhile that are
    still there at the end (the scheduler's own aside)."""
    async def send():
        before = set(threading.enumerate())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=300) as client:
            responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for body in bodies))
        if new_threads is not None:
            new_threads.extend(thread.name for thread in set(threading.enumerate()) - before
                               if thread.name != "decode-scheduler")
        return responses
    return asyncio.run(send())


def streamed_text(response):
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")), events


def test_api_answers_concurrent_requests_with_their_own_budgets_and_stop_texts(learnt, caplog):
    import api_server

    caplog.set_level(logging.INFO, logger="api_server")

    model, tokenizer, records = learnt
    records = records[:4]
    app = api_server.create_app(model, tokenizer, dict(api_server.DEFAULTS, model_dir="small", max_new_tokens=40,
                                                       max_input_tokens=200, max_batch=4))
    rows = record_steps(app.state.scheduler)
    ask = [{"model": "small", "messages": [{"role": "user", "content": user_message(r)}], "temperature": 0}
           for r in records]
    alone = [response.json()["choices"][0]["message"]["content"] for response in post_all(app, ask[:1])
             + post_all(app, ask[1:2]) + post_all(app, ask[2:3]) + post_all(app, ask[3:4])]
    assert alone == [r["answer"] for r in records]  # what the small model learnt
    stop = alone[1][2:4]  # cuts the second answer after two characters
    bodies = [{**ask[0], "max_tokens": 3}, {**ask[1], "stop": ["不会出现", stop], "stream": True},
              {**ask[2], "stream": True, "max_tokens": 2}, ask[3]]
    rows.clear()
    new_threads = []
    responses = post_all(app, bodies, new_threads)
    assert [r.status_code for r in responses] == [200] * 4 and max(rows) >= 2, rows
    assert new_threads == []  # the answers reach the event loop from the scheduler's thread: no thread per request
    first = responses[0].json()
    assert first["usage"]["completion_tokens"] == 3 and first["choices"][0]["finish_reason"] == "length"
    text, events = streamed_text(responses[1])
    assert text == alone[1][:2] and [e["choices"][0]["finish_reason"] for e in events if e.get("choices")][-1] == "stop"
    text, events = streamed_text(responses[2])
    assert events[-1]["choices"][0]["finish_reason"] == "length" and alone[2].startswith(text)
    assert responses[3].json()["choices"][0]["message"]["content"] == alone[3]
    # One line per answer with its latency as the server sees it (benchmarks/serve_load.py reads the first token's)
    lines = [record.getMessage() for record in caplog.records if "first token after" in record.getMessage()]
    assert len(lines) == 8 and all(re.search(r"^chatcmpl-\w+: \d+ prompt tokens, \d+ new; first token after "
                                             r"[\d.]+ s, done after [\d.]+ s$", line) for line in lines), lines
    assert {2, 3} <= {int(re.search(r"(\d+) new", line)[1]) for line in lines[4:]}  # the budgets of 2 and 3


def test_a_stream_left_before_its_first_reply_frees_its_row(learnt):
    """A streaming client that leaves right after the opening event, before a reply was read: its request ends at the
    next token rather than running to the end of its answer."""
    import api_server

    model, tokenizer, records = learnt
    api = api_server.ChatApi(model, tokenizer, dict(api_server.DEFAULTS, model_dir="small", max_new_tokens=40,
                                                    max_input_tokens=200, max_batch=1))
    scheduler = api.chat.scheduler
    permits, submitted, submit = gate_steps(scheduler), [], scheduler.submit
    scheduler.submit = lambda *args: submitted.append(submit(*args)) or submitted[-1]
    record = max(records, key=lambda r: len(r["answer"]))
    assert len(tokenizer.encode(record["answer"], add_special_tokens=False)) > 4
    job = api.generation_job(api_server.parse_chat_request(
        {"model": "small", "messages": [{"role": "user", "content": user_message(record)}], "max_tokens": 40,
         "temperature": 0, "stream": True}))

    async def open_then_leave():
        events = api.events(job)
        opening = await events.__anext__()
        await events.aclose()
        return opening

    opening = asyncio.run(open_then_leave())
    [request] = submitted
    assert '"role": "assistant"' in opening
    permits.release(100)
    thread = scheduler.thread
    if thread is not None:  # the batch is empty once the request has left: the scheduler's thread ends
        thread.join(timeout=120)
    assert request.cancelled.is_set() and len(request.ids) <= 2, request.ids  # its first token, at most one more


def test_api_refuses_past_max_waiting_while_the_batch_is_full(learnt):
    import api_server

    model, tokenizer, _ = learnt
    app = api_server.create_app(model, tokenizer, dict(api_server.DEFAULTS, model_dir="small", max_new_tokens=8,
                                                       max_input_tokens=200, max_batch=1, max_waiting=1))
    scheduler = app.state.scheduler
    permits = gate_steps(scheduler)
    body = {"model": "small", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 8, "temperature": 0}

    async def crowd():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=300) as client:
            running = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            while not scheduler.running:  # holds the only row (its steps wait for the test)
                await asyncio.sleep(0.01)
            waiting = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            while not scheduler.waiting:
                await asyncio.sleep(0.01)
            refused = [await client.post("/v1/chat/completions", json={**body, "stream": s}) for s in (False, True)]
            permits.release(100)
            return refused, await running, await waiting

    refused, running, waiting = asyncio.run(crowd())
    assert [r.status_code for r in refused] == [429, 429]
    assert all(r.json()["error"]["code"] == "server_busy" for r in refused)
    assert running.status_code == waiting.status_code == 200
    assert running.json()["choices"][0]["message"] == waiting.json()["choices"][0]["message"]


def test_web_page_answers_two_tabs_at_once(learnt):
    import web_demo

    model, tokenizer, records = learnt
    records = records[:2]
    chat = web_demo.WebChat(model, tokenizer, dict(max_input_tokens=200, max_new_tokens_limit=64, max_batch=2))
    rows = record_steps(chat.chat.scheduler)
    sampling = (40, 0.8, 0.8, False)

    async def tab(index):  # both tabs' answers on one event loop, as Gradio runs them
        states = [state async for state in chat.submit(user_message(records[index]), [], *sampling)]
        return states[-1][1][-1][1]

    async def both():
        return list(await asyncio.gather(tab(0), tab(1)))

    answers = asyncio.run(both())
    assert answers == [r["answer"] for r in records] and 2 in rows, rows


def test_the_shipped_small_model_answers_eight_clients_as_it_answers_one(tmp_path):
    """The README's model behind the API: eight concurrent clients share the decode steps, and each answer equals
    the answer to the same request alone (the throughput ratio is benchmarks/serve_load.py's)."""
    import api_server

    model, tokenizer = load_model_and_tokenizer(REPO_ROOT / "model_hub" / "chatglm2-small", dtype="fp32", device="cpu")
    app = api_server.create_app(model, tokenizer, dict(api_server.DEFAULTS, model_dir="small", max_new_tokens=24,
                                                       max_input_tokens=200, max_batch=8))
    rows = record_steps(app.state.scheduler)
    bodies = [{"model": "small", "messages": [{"role": "user", "content": user_message(record)}], "max_tokens": 24,
               "temperature": 0} for record in read_instruction_records(DEMO_DEV)[:8]]
    alone = [post_all(app, [body])[0].json()["choices"][0]["message"]["content"] for body in bodies]
    rows.clear()
    together = [response.json()["choices"][0]["message"]["content"] for response in post_all(app, bodies)]
    assert together == alone and max(rows) == 8, rows

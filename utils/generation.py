"""Answers to instruction records (the prompts of utils.dataset, left-padded batches), token streams and generation
timing, for ChatGLM models (their own stream_generate) and models that transformers supports natively (generate())."""
import collections
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from utils.dataset import PaddingCollator, fit_prompt, get_prompt_format, user_message


def decode_answer(tokenizer, ids, stop_ids) -> str:
    """Text of generated ids up to the first stop token. ChatGLM3 starts its turn with an (empty) metadata line,
    which strip() removes like the official post-processing does."""
    for index, token in enumerate(ids):
        if token in stop_ids:
            ids = ids[:index]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# generate() arguments that stream_generate (ChatGLM's own decode loop, with the static-cache fast path) also takes.
STREAM_GENERATE_KWARGS = {"temperature", "top_k", "top_p", "repetition_penalty"}


def native_decode_kwargs(model, decode):
    """generate() options of a native model for our decode modes: on CUDA every mode but "plain" uses transformers'
    static cache, whose decode step generate() compiles (CUDA graphs, as ChatGLM's graph mode); "plain" and the CPU
    the dynamic cache."""
    if decode not in ("auto", "plain", "static", "graph", "compiled"):
        raise ValueError(f"decode={decode!r}: expected auto, plain, static, graph or compiled")
    return {"cache_implementation": "static"} if decode != "plain" and model.device.type == "cuda" else {}


@torch.inference_mode()
def generate_answers(model, tokenizer, prompt_format, records, max_source_length=512, max_new_tokens=128, batch_size=8,
                     do_sample=False, show_progress=False, decode="auto", **generate_kwargs):
    """One answer string per record (greedy unless do_sample).

    ChatGLM models decode with their stream_generate (decode="auto": CUDA-graph steps on CUDA, see
    modeling_chatglm.py); other models, or generate() options stream_generate lacks (beams...), use generate()."""
    stop_ids = prompt_format.stop_token_ids
    collate = PaddingCollator(tokenizer.pad_token_id, padding_side="left")
    own_loop = hasattr(model, "stream_generate") and set(generate_kwargs) <= STREAM_GENERATE_KWARGS
    if not hasattr(model, "stream_generate"):
        generate_kwargs = {**native_decode_kwargs(model, decode), **generate_kwargs}
    answers = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc="generating", disable=not show_progress):
        prompts = [fit_prompt(prompt_format, user_message(r), r.get("history", []), max_source_length)[0] for r in records[start:start + batch_size]]
        batch = collate([{"input_ids": p} for p in prompts])
        input_ids, attention_mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        if own_loop:
            *_, (new_ids, _) = model.stream_generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                     eos_token_id=stop_ids, decode=decode, **generate_kwargs)
        else:
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            new_ids = output[:, input_ids.shape[1]:]
        answers += [decode_answer(tokenizer, row.tolist(), stop_ids) for row in new_ids]
    return answers


class TokenQueue:
    """A generate() streamer that hands each step's new token ids [B] to another thread."""

    def __init__(self):
        self.queue, self.prompt_seen = queue.Queue(), False

    def put(self, value):
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.queue.put(value.detach().view(-1, 1).cpu())

    def end(self):
        self.queue.put(None)


class StopFlag:
    """A generate() stopping criterion that another thread sets (the reader stopped listening)."""

    def __init__(self):
        self.set = False

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.set, dtype=torch.bool, device=input_ids.device)


def init_compiled_graph_state():
    """Give this thread the thread-local state of torch.compile's CUDA graphs: torch before 2.12 sets it up only in the
    thread that imported it (and autograd's), and a compiled decode step failed in any other thread (an assertion in
    cudagraph_trees.get_obj); later versions do this themselves."""
    from torch._inductor import cudagraph_trees

    if not hasattr(cudagraph_trees.local, "tree_manager_containers") and not torch._C._is_key_in_tls("tree_manager_containers"):
        cudagraph_trees.local.tree_manager_containers = {}
        cudagraph_trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)


# Streamed generate() calls of native models run here, one at a time: one long-lived thread keeps one set of recorded
# CUDA graphs (they are per thread), where a thread per request would record them anew each time.
GENERATION_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate", initializer=init_compiled_graph_state)


def stream_generate(model, input_ids, attention_mask, max_new_tokens, do_sample=False, eos_token_id=(), decode="auto",
                    temperature=1.0, top_p=1.0):
    """Yields (new ids [B, n], None) after every new token until every row stopped or max_new_tokens.

    ChatGLM models: their own stream_generate (static cache and CUDA graphs on CUDA). Other models: transformers'
    generate() in the generation thread (static cache and its compiled decode step on CUDA, native_decode_kwargs),
    the ids handed over by a streamer; leaving the loop early stops it at its next step."""
    if hasattr(model, "stream_generate"):
        yield from model.stream_generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                         temperature=temperature, top_p=top_p, eos_token_id=list(eos_token_id), decode=decode)
        return
    from transformers import StoppingCriteriaList

    streamer, stop, failure = TokenQueue(), StopFlag(), []
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    eos = [i for i in eos_token_id if i >= 0]
    # No stop token (timing runs pass [-1]): exactly max_new_tokens, the model's own eos ids held off.
    stops = {"eos_token_id": eos} if eos else {"min_new_tokens": max_new_tokens}
    pad_token_id = model.generation_config.pad_token_id

    def work():
        try:
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                               do_sample=do_sample, pad_token_id=eos[0] if pad_token_id is None and eos else pad_token_id,
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]),
                               **stops, **native_decode_kwargs(model, decode), **sampling)
        except BaseException as error:  # handed to the reader, which raises it
            failure.append(error)
            streamer.end()

    worker = GENERATION_THREAD.submit(work)
    columns = []
    try:
        while (column := streamer.queue.get()) is not None:
            columns.append(column)
            yield torch.cat(columns, dim=1), None
    finally:
        stop.set = True
        worker.result()
    if failure:
        raise failure[0]


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_generation(model, input_ids, max_new_tokens, decode="auto"):
    """(seconds to the first token, seconds in all) of one greedy stream_generate() run of exactly max_new_tokens
    tokens (no stop token) on input_ids [B, S]. Decode tokens/s = B * (max_new_tokens - 1) / (total - first)."""
    synchronize(input_ids.device)
    started = time.perf_counter()
    first = None
    for _ in stream_generate(model, input_ids, torch.ones_like(input_ids), max_new_tokens, eos_token_id=[-1], decode=decode):
        if first is None:
            synchronize(input_ids.device)
            first = time.perf_counter() - started
    synchronize(input_ids.device)
    return first, time.perf_counter() - started


@dataclass
class ChatReply:
    """A chat answer as it grows: its text (post-processed like the model's chat() does) and token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = None  # set on the last one: "stop" (the model ended its turn) or "length" (max_new_tokens)


def reply_text(model, tokenizer, ids) -> str:
    """The answer text of generated ids (stop token removed), post-processed by the model's own process_response:
    ChatGLM-6B restores full-width punctuation, ChatGLM3-6B drops the empty metadata line of its turn."""
    text = tokenizer.decode(ids)
    version = getattr(model, "model_version", None)
    if version == "chatglm3-6b":
        content, _ = model.process_response(text, [])
        return content if isinstance(content, str) else text.strip()  # a tool call (dict): the raw text
    if version in ("chatglm-6b", "chatglm2-6b"):
        return model.process_response(text)
    return text.strip()


@torch.inference_mode()
def stream_chat_reply(model, tokenizer, prompt_ids, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, decode="auto"):
    """Answers one prompt (ids of utils.dataset's prompt formats) token by token (stream_generate): yields a
    ChatReply after each token that completes a character, the last one with its finish_reason.

    Not re-entrant per model: callers serialise the generations of one model (the static cache lives on the model)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    stop_ids = get_prompt_format(tokenizer, getattr(model, "model_version", None)).stop_token_ids
    input_ids = torch.tensor([list(prompt_ids)], device=model.device)
    for new_ids, _ in stream_generate(model, input_ids, torch.ones_like(input_ids), max_new_tokens, do_sample=do_sample,
                                      eos_token_id=stop_ids, decode=decode, temperature=temperature, top_p=top_p):
        ids = new_ids[0].tolist()
        finish = "stop" if ids[-1] in stop_ids else "length" if len(ids) >= max_new_tokens else None
        if finish == "stop":
            ids = ids[:-1]
        text = reply_text(model, tokenizer, ids)
        if finish is None and text.endswith("\ufffd"):
            continue  # half of a multi-byte character: wait for the rest
        yield ChatReply(text.rstrip("\ufffd"), len(prompt_ids), len(ids), finish)
        if finish:
            return


class StableText:
    """The settled part of a streamed reply, for output that cannot be taken back (a terminal, server-sent events).

    The last character stays held back while the reply grows: post-processing may still rewrite it (ChatGLM-6B turns
    ',' into '，' once a Chinese character follows it)."""

    def __init__(self):
        self.shown = ""

    def update(self, text, final=False):
        """The text settled since the last call ("" if none); on the final text, the rest. None if the reply was
        rewritten before what has been shown already (then only the full text is right)."""
        settled = text if final else text[:-1]
        if not settled.startswith(self.shown):
            return None if final else ""
        piece, self.shown = settled[len(self.shown):], settled
        return piece

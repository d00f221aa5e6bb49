"""Answers to instruction records (the prompts of utils.dataset, left-padded batches), chat replies as they grow and
generation timing and peak memory, for every model, on the one decode engine (utils.decode_engine)."""
import functools
import itertools
import resource
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from utils import decode_engine
from utils.dataset import PaddingCollator
from utils.prompts import fit_prompt, get_prompt_format, user_message


def decode_answer(tokenizer, ids, stop_ids) -> str:
    """Text of generated ids up to the first stop token, stripped (of ChatGLM3's empty metadata line too)."""
    ids = itertools.takewhile(lambda token: token not in stop_ids, ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


STREAM_GENERATE_KWARGS = {"temperature", "top_k", "top_p", "repetition_penalty"}


@torch.inference_mode()
def generate_answers(model, tokenizer, prompt_format, records, max_source_length=512, max_new_tokens=128, batch_size=8,
                     do_sample=False, show_progress=False, decode="auto", **generate_kwargs):
    """One answer string per record (greedy unless do_sample), through stream_generate; generate() options that it
    lacks (beams...) go to transformers' generate()."""
    stop_ids = prompt_format.stop_token_ids
    collate = PaddingCollator(tokenizer.pad_token_id, padding_side="left")
    own_loop = set(generate_kwargs) <= STREAM_GENERATE_KWARGS
    answers = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc="generating", disable=not show_progress):
        prompts = [fit_prompt(prompt_format, user_message(r), r.get("history", []), max_source_length)[0] for r in records[start:start + batch_size]]
        batch = collate([{"input_ids": p} for p in prompts])
        input_ids, attention_mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        if own_loop:
            *_, (new_ids, _) = stream_generate(model, input_ids, attention_mask, max_new_tokens, do_sample=do_sample,
                                               eos_token_id=stop_ids, decode=decode, pad_token_id=tokenizer.pad_token_id,
                                               **generate_kwargs)
        else:
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            new_ids = output[:, input_ids.shape[1]:]
        answers += [decode_answer(tokenizer, row.tolist(), stop_ids) for row in new_ids]
    return answers


# Sampling at a lower temperature is greedy decoding in all but name, and logits / temperature would overflow to inf
# (then NaN probabilities) long before it reaches 0: such temperatures decode greedily.
GREEDY_BELOW_TEMPERATURE = 1e-5


def stream_generate(model, input_ids, attention_mask, max_new_tokens, do_sample=False, eos_token_id=(), decode="auto",
                    pad_token_id=0, wait_for_compile=True, **sampling):
    """Yields (new ids [B, n], cache) after every new token until every row stopped or max_new_tokens, through the
    decode engine. A temperature below GREEDY_BELOW_TEMPERATURE decodes greedily. wait_for_compile=False: a chat's
    answers start on the eager step while torch.compile works (decode_engine)."""
    if do_sample and sampling.get("temperature", 1.0) < GREEDY_BELOW_TEMPERATURE:
        do_sample = False
    stream = getattr(model, "stream_generate", None)  # ChatGLM's: our loader binds it to the engine, tests wrap it
    if stream is None or getattr(stream, "__func__", None) not in (None, decode_engine.stream_generate):
        stream = functools.partial(decode_engine.stream_generate, model, pad_token_id=pad_token_id)  # none, or plain
    return stream(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                  eos_token_id=list(eos_token_id), decode=decode, wait_for_compile=wait_for_compile, **sampling)


def time_generation(model, input_ids, max_new_tokens, decode="auto", wait_for_compile=True):
    """(seconds to the first token, seconds in all) of one greedy run of exactly max_new_tokens tokens on input_ids."""
    synchronize = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    synchronize()
    started, first = time.perf_counter(), None
    for _ in stream_generate(model, input_ids, torch.ones_like(input_ids), max_new_tokens, eos_token_id=[-1],
                             decode=decode, wait_for_compile=wait_for_compile):
        if first is None:
            synchronize()
            first = time.perf_counter() - started
    synchronize()
    return first, time.perf_counter() - started


def peak_memory_gib(device):
    """Peak memory in GiB: what torch allocated on a CUDA device, else the process's peak RSS (Linux: KiB)."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


@dataclass
class ChatReply:
    """A chat answer as it grows: its text (post-processed like the model's chat() does) and token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = None  # set on the last one: "stop" (the model ended its turn) or "length" (max_new_tokens)


def reply_text(model, text) -> str:
    """An answer's decoded text (stop token removed), post-processed by the model's own process_response: ChatGLM-6B
    restores full-width punctuation, ChatGLM3-6B drops the empty metadata line of its turn."""
    version = getattr(model, "model_version", None)
    if version == "chatglm3-6b":
        content, _ = model.process_response(text, [])
        return content if isinstance(content, str) else text.strip()  # a tool call (dict): the raw text
    if version in ("chatglm-6b", "chatglm2-6b"):
        return model.process_response(text)
    return text.strip()


class GrowingText:
    """The decoded text of ids that grow, decoding only the tokens since the last complete character (the offsets of
    vLLM's incremental detokenizer: the piece is decoded with the token before it, whose text is then cut off, so a
    tokenizer's leading-space rule sees the same context as in the whole). Per token the cost stays flat where
    decoding the whole answer grows with it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text, self.start, self.end = tokenizer, "", 0, 0  # ids[start:end]: the last piece

    def update(self, ids):
        """The text of `ids` (which extend the last ones) up to its last complete character; whether it grew."""
        settled = self.tokenizer.decode(ids[self.start:self.end])
        grown = self.tokenizer.decode(ids[self.start:])
        if len(grown) <= len(settled) or grown.endswith("\ufffd"):
            return False  # no new character yet (or half of a multi-byte one)
        self.text += grown[len(settled):]
        self.start, self.end = self.end, len(ids)
        return True


@torch.inference_mode()
def stream_chat_reply(model, tokenizer, prompt_ids, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, top_k=0,
                      decode="auto"):
    """A ChatReply after each token that completes a character of the answer to `prompt_ids`, the last one with its
    finish_reason. Not re-entrant per model: the static cache lives on the model, so callers serialise (servers
    answer many requests at once through utils.scheduler instead)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    stop_ids = get_prompt_format(tokenizer, getattr(model, "model_version", None)).stop_token_ids
    input_ids = torch.tensor([list(prompt_ids)], device=model.device)
    steps = stream_generate(model, input_ids, torch.ones_like(input_ids), max_new_tokens, do_sample=do_sample,
                            eos_token_id=stop_ids, decode=decode, temperature=temperature, top_p=top_p, top_k=top_k,
                            wait_for_compile=False)  # a person waits: the first answers on the eager step
    answer = AnswerReplies(model, tokenizer, len(prompt_ids), max_new_tokens)
    for new_ids, _ in steps:
        if reply := answer.reply(new_ids[0].tolist()):
            yield reply


class AnswerReplies:
    """The ChatReplies of an answer whose ids grow a token at a time (the last list may end in a stop token): `reply(ids)`
    gives one per list that completes a character, the last with its finish_reason: "stop" for a stop token or the
    first of `stop_texts` (OpenAI's `stop`: the text ends before it), "length" at max_new_tokens. The last reply's text
    is decoded from all its ids at once; the others grow a token's text at a time (GrowingText). Until the answer
    ends, a tail that may begin a stop text is held back, so streamed text never shows part of one."""

    def __init__(self, model, tokenizer, prompt_tokens, max_new_tokens, stop_texts=()):
        self.model, self.tokenizer, self.prompt_tokens, self.max_new_tokens = model, tokenizer, prompt_tokens, max_new_tokens
        self.stop_ids = get_prompt_format(tokenizer, getattr(model, "model_version", None)).stop_token_ids
        self.stop_texts, self.growing = [stop for stop in stop_texts if stop], GrowingText(tokenizer)

    def reply(self, ids):
        """The reply after `ids`, the answer's ids so far; None while they complete no new character."""
        finish = "stop" if ids[-1] in self.stop_ids else "length" if len(ids) >= self.max_new_tokens else None
        if finish == "stop":
            ids = ids[:-1]
        if finish:
            text = reply_text(self.model, self.tokenizer.decode(ids)).rstrip("\ufffd")
        elif self.growing.update(ids):
            text = reply_text(self.model, self.growing.text)
        else:
            return None
        found = [index for index in (text.find(stop) for stop in self.stop_texts) if index >= 0]
        if found:
            return ChatReply(text[:min(found)], self.prompt_tokens, len(ids), "stop")
        if not finish:
            text = text[:len(text) - max((size for stop in self.stop_texts for size in range(1, len(stop))
                                          if text.endswith(stop[:size])), default=0)]
        return ChatReply(text, self.prompt_tokens, len(ids), finish)


class StableText:
    """The settled part of a streamed reply, for output that cannot be taken back (a terminal, server-sent events):
    the last character is held back, as post-processing may still rewrite it (ChatGLM-6B: ',' -> '，')."""

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

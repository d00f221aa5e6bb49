"""Concurrent requests decoded together (continuous batching) on the one decode engine: a request joins the running
batch at a token boundary (its prompt prefilled alone, then one shared step for every row) and leaves it when it ends
(a stop token, its max_new_tokens) or is cancelled (a client gone, a stop sequence seen by the caller): its row is free
at the next token. Each request has its own sampling (greedy or temperature / top_p / top_k, an optional seed).

One thread owns the model and runs the loop while there are requests (an idle scheduler has none: it holds nothing
at exit and can be freed); callers submit from any thread and read a request's token ids as they come. The step runs
on the rows [0, bucket) for the smallest power-of-two bucket that holds the running rows (kept packed at the front),
eagerly or, on CUDA, captured once per bucket as a CUDA graph (utils.decode_engine).

Each row's next token is picked on the device. On CUDA the step on those tokens is queued before the host reads them
(as utils.decode_engine.decode_loop does), so the GPU computes the next tokens while the host hands these out and the
servers turn them into replies; a request that ends has had one step too many, whose token is dropped. On the CPU the
tokens are handed out first and the step runs on the rows still running.
"""
import asyncio
import collections
import threading
import time
from dataclasses import dataclass

import torch

from utils import decode_engine
from utils.generation import GREEDY_BELOW_TEMPERATURE


class ServerBusy(Exception):
    """Every row is taken and `max_waiting` requests already wait."""


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # the request's own random stream (sampling only); None: the process's


class Request:
    """One request in the scheduler. Its ids so far come after every token (the last may be a stop token) through
    `new_ids()` in a thread or `new_ids_async()` on an event loop (the servers'), and end when the request does;
    `cancel()` frees its row at the next token."""

    def __init__(self, prompt_ids, max_new_tokens, sampling):
        self.prompt_ids, self.max_new_tokens, self.sampling = list(prompt_ids), max_new_tokens, sampling
        self.ids, self.start = [], None
        # Latency as the server sees it: submitted (perf_counter), and seconds from then to the first token handed out
        self.submitted, self.first_token_after = time.perf_counter(), None
        self.updates = collections.deque()
        self.ready = threading.Condition()
        self.wake_loop = None  # set by new_ids_async: wakes its event loop from the scheduler's thread
        self.cancelled = threading.Event()
        self.generator = self.processors = self.scheduler = None

    def cancel(self):
        self.cancelled.set()
        if self.scheduler is not None:
            self.scheduler.withdraw(self)

    def publish(self, item):
        """From the scheduler: a list of ids, an exception, or None for the end."""
        with self.ready:
            self.updates.append(item)
            self.ready.notify()
            wake = self.wake_loop
        if wake is not None:
            wake()

    def take(self):
        """(the newest list of ids or None, whether the request has ended) from what was published since the last
        call; raises the scheduler's error. A reader that falls behind gets the newest list only."""
        with self.ready:
            items = list(self.updates)
            self.updates.clear()
        error = next((item for item in items if isinstance(item, BaseException)), None)
        if error is not None:
            raise error
        lists = [item for item in items if item is not None]
        return (lists[-1] if lists else None), None in items

    def new_ids(self):
        """The ids so far after each token, read in a thread."""
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.updates)
            ids, ended = self.take()
            if ids is not None:
                yield ids
            if ended:
                return

    async def new_ids_async(self):
        """The ids so far after each token, read on the running event loop: the scheduler's thread wakes the loop, so
        no thread is woken per token in between."""
        loop, published = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(published.set)
            except RuntimeError:  # the loop is closed: nobody reads this request any more
                self.cancelled.set()

        self.wake_loop = wake
        while True:
            published.clear()
            ids, ended = self.take()
            if ids is not None:
                yield ids
            if ended:
                return
            if ids is None:
                await published.wait()


# Prompts prefilled in one forward pass hold at most this many token slots (padded): joining requests share their
# prefill, and its activations and temporary cache stay small beside the running batch's.
PREFILL_TOKENS = 4096


def prefill_groups(requests):
    """Consecutive groups of requests whose prompts, padded to the group's longest, fit in PREFILL_TOKENS (a longer
    prompt alone)."""
    groups, longest = [], 0
    for request in requests:
        longest_with = max(longest, len(request.prompt_ids))
        if groups and longest_with * (len(groups[-1]) + 1) <= PREFILL_TOKENS:
            groups[-1].append(request)
            longest = longest_with
        else:
            groups.append([request])
            longest = len(request.prompt_ids)
    return groups


def next_bucket(rows, largest):
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, largest)


def kv_bytes_per_token(model):
    """Bytes of keys and values one token takes in the cache (all layers), in the model's compute dtype."""
    config = model.config
    if hasattr(model, "static_decode_step"):  # our model files
        transformer = model.transformer
        layers, heads, head_dim = transformer.num_layers, transformer.num_kv_heads, transformer.head_dim
    else:
        layers = config.num_hidden_layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    return layers * 2 * heads * head_dim * element


class Scheduler:
    """The running batch of one model: at most `max_batch` rows, each with room for `row_tokens` tokens of a prompt and
    its answer; at most `max_waiting` requests wait for a row, more are refused (ServerBusy)."""

    def __init__(self, model, stop_ids, max_batch, max_waiting, row_tokens, decode="auto"):
        self.model, self.stop_ids, self.max_batch, self.max_waiting = model, set(stop_ids), max_batch, max_waiting
        self.device = model.device
        self.mode = decode_engine.resolve_mode(decode, self.device, "graph")
        self.rows = decode_engine.rows_class(model)(model, max_batch, row_tokens)
        self.row_tokens = row_tokens
        self.running, self.waiting, self.steps = [], collections.deque(), {}
        # Each running row's next input token, on the device: picked after its prefill or a step, read by the host
        # (handed out) before or, on CUDA, after the step on it is queued.
        self.next_tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.queue_ahead = self.device.type == "cuda"
        if self.queue_ahead:
            self.landing = torch.zeros(max_batch, dtype=torch.long, pin_memory=True)
            self.copied = torch.cuda.Event()
        self.changed = threading.Condition()
        self.stopping, self.thread = False, None

    # ---- callers ----

    def check_room(self):
        with self.changed:
            self.refuse_if_full()

    def refuse_if_full(self):
        free_rows = self.max_batch - len(self.running)
        if len(self.waiting) - free_rows >= self.max_waiting:
            raise ServerBusy(f"the server is busy: {self.max_batch} requests are being answered and "
                             f"{len(self.waiting) - free_rows} are waiting; try again later")

    def submit(self, prompt_ids, max_new_tokens, sampling=None):
        if len(prompt_ids) + max_new_tokens > self.row_tokens:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new tokens exceed the "
                             f"{self.row_tokens} tokens of a row of the running batch")
        request = Request(prompt_ids, max_new_tokens, sampling or Sampling())
        request.scheduler = self
        with self.changed:
            if self.stopping:
                raise RuntimeError("this scheduler was closed")
            self.refuse_if_full()
            self.waiting.append(request)
            if self.thread is None:
                self.thread = threading.Thread(target=self.loop, name="decode-scheduler", daemon=True)
                self.thread.start()
        return request

    def withdraw(self, request):
        """A cancelled request that still waits leaves the line at once (a running one at the next token)."""
        with self.changed:
            if request in self.waiting:
                self.waiting.remove(request)
                request.publish(None)

    def warm_up(self, prompt_ids):
        """On CUDA, the step of every batch size captured now rather than while users wait for their answers."""
        if self.mode not in ("graph", "compiled"):
            return
        for size in sorted({next_bucket(rows, self.max_batch) for rows in range(1, self.max_batch + 1)}):
            with self.changed:  # all of them join at the same token boundary
                requests = [self.submit(prompt_ids, 2) for _ in range(size)]
            for request in requests:
                for _ in request.new_ids():
                    pass

    def close(self):
        """The requests still here end without an answer (at the next token); no more are taken."""
        with self.changed:
            self.stopping, thread = True, self.thread
        if thread is not None:
            thread.join()

    # ---- the scheduler's thread ----

    def loop(self):
        with torch.inference_mode():
            while True:
                with self.changed:
                    if self.stopping or not (self.running or self.waiting):  # the next submit starts a new thread
                        for request in [*self.running, *self.waiting]:
                            request.publish(None)
                        self.running, self.thread = [], None
                        self.waiting.clear()
                        return
                    newcomers = [self.waiting.popleft()
                                 for _ in range(min(len(self.waiting), self.max_batch - len(self.running)))]
                try:
                    for group in prefill_groups(newcomers):
                        self.start(group)
                    if self.running:
                        self.decode_step()
                except Exception as err:  # every request in the batch gets the error; the loop goes on
                    for request in self.running + [r for r in newcomers if r not in self.running]:
                        request.publish(err)
                        request.publish(None)
                    self.running = []

    def start(self, requests):
        """Requests join the batch: their prompts prefilled together, each in a row of its own, its first token
        picked (handed out with the next step)."""
        for request in requests:
            if request.cancelled.is_set():  # its client left while it waited
                request.publish(None)
        requests = [request for request in requests if not request.cancelled.is_set()]
        if not requests:
            return
        for request in requests:
            sampling = request.sampling
            if sampling.do_sample and sampling.temperature >= GREEDY_BELOW_TEMPERATURE:  # else greedy
                request.processors = decode_engine.logits_processors(self.model, True, sampling.temperature,
                                                                     sampling.top_k, sampling.top_p)
                if sampling.seed is not None:
                    request.generator = torch.Generator(self.device).manual_seed(sampling.seed)
        if not self.running and self.rows.cache is not None:
            self.rows.set_column(self.rows.prefix)  # an empty batch starts at the front again
        first_row = len(self.running)
        logits = self.rows.admit(first_row, [request.prompt_ids for request in requests])
        for request in requests:
            request.start = self.rows.column - len(request.prompt_ids)
        self.running.extend(requests)
        self.next_tokens[first_row:first_row + len(requests)] = self.pick(requests, logits)

    def decode_step(self):
        """One token boundary: the running rows' next tokens handed out, and the step on them (queued first on CUDA)."""
        requests = list(self.running)
        if self.queue_ahead:
            self.landing[:len(requests)].copy_(self.next_tokens[:len(requests)], non_blocking=True)
            self.copied.record()
            self.launch()
            self.copied.synchronize()  # the copy only, not the step queued after it
            tokens = self.landing[:len(requests)].tolist()
        else:
            tokens = self.next_tokens[:len(requests)].tolist()
        self.hand_out(requests, tokens)
        if not self.queue_ahead and self.running:
            self.launch()

    def launch(self):
        """The step on the running rows' next tokens; their tokens after it picked into next_tokens."""
        if self.rows.column >= self.rows.capacity:  # the end of the buffer: move every row to the left
            offset = self.rows.prefix - min(request.start for request in self.running)
            self.rows.shift(offset)
            for request in self.running:
                request.start += offset
        bucket = next_bucket(len(self.running), self.max_batch)
        logits = self.run_step(bucket, self.next_tokens[:bucket, None])
        self.rows.advance()
        self.next_tokens[:len(self.running)] = self.pick(self.running, logits)

    def run_step(self, bucket, tokens):
        step = self.steps.get(bucket)
        if step is not None:
            return step(tokens)
        function = self.rows.step(bucket)
        if self.mode not in ("graph", "compiled"):
            self.steps[bucket] = function
            return function(tokens)
        if self.mode == "compiled":
            function = torch.compile(function, mode="default")
        captured = decode_engine.CapturedStep(function, tokens)  # runs this step, then records it
        self.steps[bucket] = captured
        return captured.first_logits

    def pick(self, requests, logits):
        """The next token of each request (row i of logits for requests[i]), with its own sampling: a tensor on the
        device, so nothing here waits for the GPU."""
        tokens = logits[:len(requests)].argmax(-1)
        for index, request in enumerate(requests):
            if request.processors is not None:
                scores = request.processors(torch.empty(1, 0, dtype=torch.long, device=logits.device),
                                            logits[index:index + 1])
                probabilities = torch.softmax(scores.float(), dim=-1)
                tokens[index] = torch.multinomial(probabilities, 1, generator=request.generator)[0, 0]
        return tokens

    def hand_out(self, requests, tokens):
        """Each request its next token; requests that end (or were cancelled) leave the batch."""
        now = time.perf_counter()
        for request, token in zip(requests, tokens):
            if not request.ids:
                request.first_token_after = now - request.submitted
            request.ids.append(token)
            request.publish(list(request.ids))
        for request in requests:
            if request.ids[-1] in self.stop_ids or len(request.ids) >= request.max_new_tokens or request.cancelled.is_set():
                self.leave(request)

    def leave(self, request):
        row, last = self.running.index(request), len(self.running) - 1
        if row != last:  # keep the running rows packed at the front
            self.rows.move(last, row)
            self.next_tokens[row] = self.next_tokens[last]
            self.running[row] = self.running[last]
        self.rows.release(last)
        self.running.pop()
        request.publish(None)

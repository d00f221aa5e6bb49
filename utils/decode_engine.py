"""The one decode engine, for ChatGLM-6B/2/3 (our model files' static KV cache and step), GLM-4 (transformers' classes on
ChatGLM2's cache and step: utils.glm_decode) and the other models transformers supports natively (its StaticCache): the
prompt prefilled, then per token one fixed-shape step on the static cache, on CUDA captured once per (batch, cache size)
as a CUDA graph and replayed (figures: docs/benchmarks.md). On CUDA each token's step is queued before the token is read
back and handed out, so the host's work per token overlaps the GPU's (decode_loop), and a step about to be captured runs
before the first token is handed out.

decode: "plain" = ChatGLM's own loop (forward() with a growing DynamicCache; other models: transformers' eager steps on
its static cache), "static" = eager static steps, "graph" = the step captured as a CUDA graph, "compiled" = the step
fused by torch.compile, then captured; "auto" = on CUDA "graph" for ChatGLM and GLM-4, "compiled" for the others (each
the faster one), "plain" elsewhere. All give the same tokens. A chat (wait_for_compile=False) does not wait for
torch.compile (the models that "auto" compiles for): until the compiled step of its shapes is ready (NativeCompiler, in
a thread of its own), answers run on the eager step captured as a graph, and the answer after it is ready on the
compiled one. The compilation starts when the first such answer ends, not while it runs: the compiler's thread holds the
interpreter most of the time, and the answer a person waits for would decode at a fraction of its speed (GLM-4-9B on an
H100: 8-10 tok/s beside the compiler, 38 without).
"""
import copy
import functools
import inspect
import logging
import sys
import threading
import weakref

import torch
from transformers import (DynamicCache, LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StaticCache,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from utils import glm_decode
from utils.sdpa_backends import without_per_shape_plans

logger = logging.getLogger(__name__)

MODES = ("auto", "plain", "static", "graph", "compiled")
# Native caches' lengths are rounded up to this: one captured graph serves similar lengths (ChatGLM: powers of two).
CACHE_BUCKET = 256


def resolve_mode(decode, device, auto_on_cuda):
    if decode not in MODES:
        raise ValueError(f"decode={decode!r}: use one of {', '.join(MODES)}")
    if decode in ("graph", "compiled") and device.type != "cuda":
        raise ValueError(f"decode={decode!r} replays CUDA graphs and needs the model on a CUDA device")
    if decode == "auto":
        return auto_on_cuda if device.type == "cuda" else "plain"
    return decode


def logits_processors(model, do_sample, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                      logits_processor=None):
    """Logits -> scores as our model files' stream_generate does it (ChatGLM: its own list, with the NaN guard)."""
    if hasattr(model, "logits_processors"):
        return model.logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty, logits_processor)
    penalty = [RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty != 1.0 else []
    processors = LogitsProcessorList(penalty + list(logits_processor or []))
    warpers = ((TemperatureLogitsWarper, temperature, temperature != 1.0), (TopKLogitsWarper, top_k, top_k),
               (TopPLogitsWarper, top_p, top_p < 1.0))
    processors.extend(warper(value) for warper, value, wanted in warpers if do_sample and wanted)
    return processors


def weights_key(model):
    """What a captured step (its kernels on its tensors) depends on besides its buffers: every layer, the address of
    every weight, the switches of adapter layers (PEFT's disable_adapter(), merging); a change means capturing again."""
    modules = list(model.modules())
    switches = tuple((module.disable_adapters, tuple(module.active_adapters), tuple(module.merged_adapters))
                     for module in modules if hasattr(module, "merged_adapters"))  # PEFT's adapter layers
    return tuple(map(type, modules)), switches, tuple(param.data_ptr() for param in model.parameters())


class CapturedStep:
    """`function(tokens [B, 1])` -> logits, captured as a CUDA graph: replays copy the tokens into a fixed buffer and
    return the logits in a fixed tensor (overwritten by the next replay)."""

    def __init__(self, function, tokens):
        # One real run off the capture stream first (lazy set-up, compilation), as CUDA graphs require; recording
        # runs nothing, so the step's state advances once, and this run's logits are the step's.
        self.tokens = tokens.clone()
        current = torch.cuda.current_stream(tokens.device)
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.first_logits = function(self.tokens)
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = function(self.tokens)

    def __call__(self, tokens):
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


class StepRunner:
    """A model's decode step as `mode` runs it: eagerly, or captured and replayed while the cache buffers, layers,
    weights and adapter switches stay as they were (one captured step per model: a graph pool per shape adds up)."""

    def __init__(self, model, steps, mode, wait_for_compile=True):
        self.compile_after = None
        if mode == "compiled" and not wait_for_compile and not steps.compiled_ready(start=False):
            mode = "graph"  # this answer on the eager step; the compiled one from the answer after it is ready
            self.compile_after = steps
        self.model, self.steps, self.mode, self.captured = model, steps, mode, None
        if mode in ("graph", "compiled") and steps.owner is not None:
            self.key = (weakref.ref(steps.owner), mode, weights_key(model))  # a dead buffer owner matches nothing
            slot = model.__dict__.get("_decode_graph")
            self.captured = slot[1] if slot and slot[0] == self.key else None

    def answer_done(self):
        """Starts the compilation this answer did not wait for (in the background; see the module's doc)."""
        if self.compile_after is not None:
            self.compile_after.compiled_ready(start=True)

    def __call__(self, tokens):
        self.steps.advance()
        if self.mode in ("plain", "static"):
            return self.steps.forward(tokens)
        if self.captured is not None:
            return self.captured(tokens)
        self.model.__dict__.pop("_decode_graph", None)  # free the old graph's pool first
        function = self.steps.compiled_forward() if self.mode == "compiled" else self.steps.forward
        self.captured = CapturedStep(function, tokens)
        self.model.__dict__["_decode_graph"] = (self.key, self.captured)
        return self.captured.first_logits


class ChatGLMSteps:
    """Our model files' static cache (a StaticKVCache, kept on the model and reused while it fits) and decode step
    (static_decode_step: one token, advancing the cache). The prompt goes through forward() into a DynamicCache, or
    continues the cache of an earlier turn, and is copied in."""

    auto_on_cuda = "graph"

    def __init__(self, model):
        self.model, self.owner, self.past = model, None, None

    def prefill(self, input_ids, attention_mask, past_key_values, max_new_tokens):
        model = self.model
        if hasattr(past_key_values, "to_dynamic"):  # the StaticCacheRef of an earlier turn
            past_key_values = past_key_values.to_dynamic(model.config)
        self.past = past_key_values if past_key_values is not None else DynamicCache(config=model.config)
        positions = model.get_position_ids(input_ids, attention_mask)[..., -input_ids.shape[1]:]
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=attention_mask, use_cache=True,
                       past_key_values=self.past, logits_to_keep=1).logits[:, -1].float()
        if max_new_tokens > 1:
            needed, dtype = self.past.get_seq_length() + max_new_tokens - 1, self.past.layers[0].keys.dtype
            self.owner = model.static_cache(input_ids.shape[0], needed, dtype, input_ids.device)
            self.ref_type = type(self.owner.load(self.past, attention_mask, model.transformer.pre_seq_len,
                                                 model.advance_positions(positions[..., -1:].clone())))
        return logits

    def handle(self):
        """The cache to hand out: the filled part of the static one (valid until the model's next generation)."""
        return self.past if self.owner is None else self.ref_type(self.owner)

    def advance(self):
        self.owner.length += 1

    def forward(self, tokens):
        return self.model.static_decode_step(tokens, self.owner)

    def compiled_forward(self):
        compiled = self.model.__dict__.get("_compiled_decode_step")
        if compiled is None:
            compiled = torch.compile(self.model.static_decode_step, fullgraph=True, dynamic=False)
            self.model.__dict__["_compiled_decode_step"] = compiled
        return lambda tokens: compiled(tokens, self.owner)


class GlmSteps:
    """GLM-4 (transformers' Glm and Glm4 classes) on utils.glm_decode's step, as ChatGLM on its own: the prompt goes
    through the model's forward into a DynamicCache (positions counted over real tokens, as generate() gives them) and
    is copied into the model's StaticKVCache. A first answer waits for no compilation: "graph" is the fast step."""

    auto_on_cuda = "graph"

    def __init__(self, model):
        self.model, self.owner = model, None

    def prefill(self, input_ids, attention_mask, past_key_values, max_new_tokens):
        if past_key_values is not None:
            raise ValueError("past_key_values: only ChatGLM models continue from a cache here")
        model, (batch, length) = self.model, input_ids.shape
        logits, past = native_prefill(model, input_ids, attention_mask)
        if max_new_tokens > 1:
            glm_decode.refresh_fused_projections(model)
            keys = past.layers[0].keys
            self.owner = glm_decode.static_cache(model, batch, length + max_new_tokens - 1, keys.dtype, keys.device)
            self.owner.load(past, attention_mask, 0, attention_mask.long().sum(-1, keepdim=True))
        return logits

    def handle(self):
        return None

    def advance(self):
        self.owner.length += 1

    def forward(self, tokens):
        return glm_decode.static_decode_step(self.model, tokens, self.owner)

    def compiled_forward(self):
        compiled = self.model.__dict__.get("_compiled_glm_step")
        if compiled is None:
            compiled = torch.compile(glm_decode.static_decode_step, dynamic=False)
            self.model.__dict__["_compiled_glm_step"] = compiled
        return lambda tokens: compiled(self.model, tokens, self.owner)


class NativeSteps:
    """A transformers StaticCache with the step's inputs as fixed buffers (batch B, up to `length` positions), kept on
    the model per (B, length) and reused: positions past the current one hold stale keys, which the mask hides.

    Left-padded batches: a query sees the keys of its own row that are no padding and not in its future; a padding
    position sees itself only (all keys masked would give NaN, which poisons later sums even at weight 0). Positions
    count real tokens (cumsum of the mask), as generate() gives them."""

    auto_on_cuda = "compiled"  # fused element-wise work; "graph" replays transformers' eager kernels, one per small op

    def __init__(self, model, batch, length):
        self.model, self.key = model, (batch, length)
        device, dtype = model.device, model.dtype
        self.cache = self.owner = StaticCache(config=model.config, max_cache_len=length)  # new with these buffers
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.blocked = torch.finfo(dtype).min
        self.mask = torch.full((batch, 1, 1, length), self.blocked, dtype=dtype, device=device)  # the step's query row
        self.cache_kwarg = self.cache_kwarg_of(model)

    @staticmethod
    def cache_kwarg_of(model):
        # transformers 5.2x renamed forward's past_key_values to cache (the old name warns); 5.17 knows only the old.
        forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    @classmethod
    def of(cls, model, batch, length):
        """The model's steps for this batch size and (bucketed) length, made on first use (one at a time)."""
        key = (batch, -(-length // CACHE_BUCKET) * CACHE_BUCKET)
        if model.__dict__.get("_native_steps", (None,))[0] != key:
            model.__dict__["_native_steps"] = None  # free the old buffers first
            model.__dict__["_native_steps"] = (key, cls(model, *key))
        return model.__dict__["_native_steps"][1]

    def prefill(self, input_ids, attention_mask, past_key_values, max_new_tokens):
        if past_key_values is not None:
            raise ValueError("past_key_values: only ChatGLM models continue from a cache here")
        batch, length = input_ids.shape
        real = attention_mask.bool()
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        sees = (real[:, None, :] & causal) | torch.eye(length, dtype=torch.bool, device=input_ids.device)
        mask = torch.full((batch, 1, length, self.mask.shape[-1]), self.blocked, dtype=self.mask.dtype,
                          device=real.device)
        mask[:, 0, :, :length].masked_fill_(sees, 0.0)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.cache.reset()  # transformers >= 5.2x: its layers count the positions written, whatever cache_position says
        with without_per_shape_plans():  # every prompt length is a new shape
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                cache_position=torch.arange(length, device=input_ids.device),
                                logits_to_keep=torch.tensor([length - 1]),  # an index: 1 makes a per-row product
                                **{self.cache_kwarg: self.cache}).logits[:, -1]
        self.position.copy_(positions[:, -1:])
        self.cache_position.fill_(length - 1)
        self.index = length - 1  # the host counts the steps: no device sync to know where the next key goes
        self.mask.fill_(self.blocked)  # stale keys of an earlier use, past the prompt, stay hidden
        self.mask[:, 0, 0, :length].masked_fill_(real, 0.0)
        return logits

    def handle(self):
        return None

    def advance(self):
        self.position += 1
        self.cache_position += 1
        self.index += 1
        self.mask[:, 0, 0, self.index] = 0.0  # the new token is a key for every row from now on

    def inputs(self, tokens):
        return self.model, self.cache_kwarg, self.cache, tokens, self.mask, self.position, self.cache_position

    def forward(self, tokens):
        return native_step(*self.inputs(tokens))

    def compiled_forward(self):
        step = NativeCompiler.of(self.model).step
        return lambda tokens: step(*self.inputs(tokens))

    def compiled_ready(self, start=True):
        return NativeCompiler.of(self.model).ready(self.key, start)


def native_prefill(model, input_ids, attention_mask):
    """A native model's forward over left-padded prompts into a new DynamicCache: (logits [B, vocab] of the last
    column, the cache). Positions count each row's real tokens, as generate() gives them."""
    past = DynamicCache(config=model.config)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with without_per_shape_plans():  # every prompt length is a new shape
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                       logits_to_keep=torch.tensor([input_ids.shape[1] - 1]),  # an index: 1 makes a per-row product
                       **{NativeSteps.cache_kwarg_of(model): past}).logits[:, -1]
    return logits, past


def native_step(model, cache_kwarg, cache, tokens, mask, position, cache_position):
    """One token of every row on a native model's static cache: logits [B, vocab]."""
    return model(input_ids=tokens, attention_mask=mask, position_ids=position, use_cache=True,
                 cache_position=cache_position, **{cache_kwarg: cache}).logits[:, -1]


class NativeCompiler:
    """A native model's step through torch.compile (one per model). The compiled code guards on the shapes of the
    step's tensors, not on which tensors they are, so it is made on buffers of its own (a twin of the steps) in a
    thread of its own, while answers run on the eager step; steps of those shapes then use it without compiling."""

    def __init__(self, model):
        # No CUDA graphs of torch.compile's own: ours capture the fused step, in whatever thread the caller runs.
        self.model_ref, self.step = weakref.ref(model), torch.compile(native_step, mode="default")
        self.compiled, self.threads = set(), {}  # keys (batch, length) compiled; the thread started for each key

    @classmethod
    def of(cls, model):
        if "_native_compiler" not in model.__dict__:
            model.__dict__["_native_compiler"] = cls(model)
        return model.__dict__["_native_compiler"]

    def ready(self, key, start=True):
        """Whether the step of these shapes is compiled; if not (and `start`), its compilation starts (once) in the
        background."""
        if start and key not in self.compiled and key not in self.threads:
            self.threads[key] = threading.Thread(target=self.compile, args=(key,), daemon=True,
                                                 name=f"compile decode step {key}")
            self.threads[key].start()
        return key in self.compiled

    def wait(self):
        """Until every compilation started has ended."""
        for thread in list(self.threads.values()):
            thread.join()

    def compile(self, key):
        model = self.model_ref()
        if model is None:
            return
        stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        try:
            with torch.inference_mode(), torch.cuda.stream(stream):  # off the answers' stream; the same grad mode
                twin = NativeSteps(model, *key)
                prompt = torch.zeros(key[0], 1, dtype=torch.long, device=model.device)
                twin.prefill(prompt, torch.ones_like(prompt), None, 2)
                twin.advance()
                self.step(*twin.inputs(prompt))
                if stream is not None:
                    stream.synchronize()
            self.compiled.add(key)
        except Exception as error:  # noqa: BLE001 (answers go on with the eager step: a slower decode, said once)
            logger.warning("compiling the decode step for batch %d, %d positions failed (%s: %s); answers go on with "
                           "the eager step", *key, type(error).__name__, error)


@torch.inference_mode()
def stream_generate(model, input_ids, attention_mask=None, past_key_values=None, max_length=None, max_new_tokens=None,
                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=None,
                    logits_processor=None, decode="auto", pad_token_id=None, wait_for_compile=True):
    """Yields (new ids [B, n], cache) after every token, until every row wrote one of eos_token_id or at
    max_new_tokens (or the total max_length); rows that stopped get pad_token_id (default: the first stop token).
    wait_for_compile=False (with decode="auto"): an answer never waits for torch.compile (see the module's doc).
    The arguments of our model files' stream_generate, which a model of utils.model_loading's loader runs through this.
    The cache handed out continues a ChatGLM conversation (past_key_values); native models hand out None."""
    chatglm = hasattr(model, "static_decode_step")
    glm = not chatglm and glm_decode.serves(model)  # GLM-4: "plain" is transformers' own step, the others ours
    steps_class = ChatGLMSteps if chatglm else GlmSteps if glm else NativeSteps
    mode = resolve_mode(decode, input_ids.device, steps_class.auto_on_cuda)
    if chatglm and mode == "plain":  # the model file's own loop (on a PEFT model's base, its adapter layers inside)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        yield from type(base).stream_generate(base, input_ids, attention_mask, past_key_values, max_length,
                                              max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                                              eos_token_id, logits_processor)
        return
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if max_new_tokens is None:
        max_new_tokens = (max_length or model.max_sequence_length) - attention_mask.shape[1]
    if max_new_tokens < 1:
        raise ValueError(f"prompt of {attention_mask.shape[1]} tokens leaves no room under max_length={max_length}")
    stops = torch.tensor(eos_token_id if eos_token_id is not None else model.config.eos_token_id).flatten()
    stops = (stops if stops.numel() else torch.tensor([-1])).to(input_ids.device)
    batch, length = input_ids.shape
    if steps_class is NativeSteps or mode == "plain":
        steps = NativeSteps.of(model, batch, length + max_new_tokens)
    else:
        steps = steps_class(model)
    logits = steps.prefill(input_ids, attention_mask, past_key_values, max_new_tokens)
    processors = logits_processors(model, do_sample, temperature, top_k, top_p, repetition_penalty, logits_processor)
    fill = stops[0] if pad_token_id is None else pad_token_id
    runner = StepRunner(model, steps, mode, wait_for_compile or decode != "auto")
    try:
        yield from decode_loop(runner, steps, logits, input_ids, max_new_tokens, stops, fill,
                               processors, do_sample)
    finally:  # also when the caller stops reading early (a stop text, a client gone)
        runner.answer_done()


def decode_loop(step, steps, logits, input_ids, max_new_tokens, stops, fill, processors, do_sample):
    """The tokens after a prefill's logits: pick one per row, run the step on them, hand them out (as host tensors).

    On CUDA the step on token n is queued before the host reads token n (a copy to pinned memory, then an event), so
    the GPU computes token n + 1 while the host hands token n out: the host's work per token (picking, the stop check,
    the caller's text) no longer leaves the GPU idle. After a stop token the queued step is wasted, not waited for.
    On the CPU the step runs after the token is handed out."""
    batch, device = input_ids.shape[0], input_ids.device
    queue_ahead = device.type == "cuda"
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    sequence = input_ids
    new_ids = torch.empty(batch, max_new_tokens, dtype=torch.long)  # what is handed out
    landing = torch.empty(batch + 1, dtype=torch.long, pin_memory=queue_ahead)  # this token, and "any row goes on"
    copied = torch.cuda.Event() if queue_ahead else None
    for index in range(max_new_tokens):
        scores = processors(sequence, logits.float())
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1) if do_sample else scores.argmax(-1)
        tokens = torch.where(unfinished, tokens, fill)
        sequence = torch.cat((sequence, tokens[:, None]), dim=1)
        unfinished &= ~torch.isin(tokens, stops)
        handle = steps.handle()  # the cache of the tokens before this one, as the plain loop hands it out
        landing.copy_(torch.cat((tokens, unfinished.any()[None].long())), non_blocking=queue_ahead)
        last = index + 1 == max_new_tokens
        if queue_ahead:
            copied.record()
            if not last:
                logits = step(tokens[:, None])
            copied.synchronize()  # the copy only, not the step queued after it
        new_ids[:, index] = landing[:batch]
        more = not last and bool(landing[batch])
        yield new_ids[:, :index + 1], handle
        if not more:
            return
        if not queue_ahead:
            logits = step(tokens[:, None])


# ---- Rows of a continuous batch (utils.scheduler): requests join and leave between steps ----
#
# All rows write their next key at one shared column of a static cache of `row_tokens` columns (after P-tuning's
# prefix); a row's prompt is placed so that it ends at that column, and each row sees only its own columns (ChatGLM's
# `valid`, native models' mask). When the column reaches the end, every row's columns move left by the free space
# before the oldest row, which exists while a prompt and its answer take fewer than `row_tokens` columns. Positions
# are per row, so where a row's keys lie in the buffer does not change what it computes.


def rows_class(model):
    """The rows that serve `model`: ChatGLM's, GLM-4's (on ChatGLM's cache and step) or transformers' own."""
    if hasattr(model, "static_decode_step"):
        return ChatGLMRows
    return GlmRows if glm_decode.serves(model) else NativeRows


def left_padded(prompts, device):
    """input_ids and attention_mask [n, longest] of token-id lists, padded on the left (so every prompt ends at the
    last column, where the next token's logits are)."""
    longest = max(map(len, prompts))
    input_ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for index, prompt in enumerate(prompts):
        input_ids[index, longest - len(prompt):] = torch.tensor(prompt)
        mask[index, longest - len(prompt):] = 1
    return input_ids.to(device), mask.to(device)


class Rows:
    """What both kinds of rows share: moving the columns after the prefix (`column_tensors`: (tensor with the columns
    on its last dimension, the value of an empty column or None)). `admit` prefills several prompts in one forward
    pass (left-padded), so requests that arrive together wait for one prefill, not one after another."""

    def admit(self, first_row, prompts):
        """Prefill prompts together and place prompt i in row first_row + i, ending at the shared column: the logits
        [n, vocab] of their last tokens."""
        logits, past, next_positions = self.prefill(prompts)
        if self.cache is None:
            self.allocate(past, next_positions)
        longest = max(map(len, prompts))
        self.make_room(longest)
        for index, prompt in enumerate(prompts):
            self.place(first_row + index, self.column - len(prompt), past, index, longest - len(prompt), next_positions)
        return logits

    def make_room(self, length):
        if self.column - self.prefix < length:
            self.shift(length - (self.column - self.prefix))

    def shift(self, offset):
        """Every row's columns after the prefix `offset` to the right (< 0: to the left)."""
        start, end = self.prefix, self.column
        for tensor, empty in self.column_tensors():
            tensor[..., start + max(offset, 0):end + offset] = tensor[..., start - min(offset, 0):end].clone()
            if empty is not None:
                tensor[..., max(end + offset, start):end] = empty
                tensor[..., start:start + max(offset, 0)] = empty
        self.set_column(end + offset)


class ChatGLMRows(Rows):
    """The rows on our model files' StaticKVCache (prefix columns of P-tuning first, shared by every row)."""

    def __init__(self, model, rows, row_tokens):
        self.model, self.rows, self.cache = model, rows, None
        self.prefix = self.column = model.transformer.pre_seq_len
        self.capacity = self.prefix + row_tokens

    def prefill(self, prompts):
        """(logits [n, vocab] of each prompt's last token, their DynamicCache (left-padded), the positions of each
        prompt's next token)."""
        model = self.model
        input_ids, mask = left_padded(prompts, model.device)
        past = DynamicCache(config=model.config)
        positions = model.get_position_ids(input_ids, mask)
        logits = model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                       past_key_values=past, logits_to_keep=1).logits[:, -1].float()
        return logits, past, model.advance_positions(positions[..., -1:].clone())

    def place(self, row, start, past, index, padding, next_positions):
        """Prompt `index` of a prefill (after its `padding` pad columns) into `row`, columns [start, column)."""
        for layer_index, layer in enumerate(past.layers):
            self.cache.keys[layer_index][row, :, start:self.column] = layer.keys[index, :, self.prefix + padding:]
            self.cache.values[layer_index][row, :, start:self.column] = layer.values[index, :, self.prefix + padding:]
        self.cache.valid[row, self.prefix:] = False
        self.cache.valid[row, start:self.column] = True
        self.cache.positions[row] = next_positions[index]

    def allocate(self, past, next_positions):
        """The buffers, shaped after the first prefill's cache (the prefix, the same for every row, copied in)."""
        keys = past.layers[0].keys  # [n, kv_heads, prefix + length, head_dim]
        self.cache = self.static_kv_cache()(len(past.layers), self.rows, keys.shape[1], self.capacity, keys.shape[3],
                                     tuple(next_positions.shape[1:]), keys.dtype, keys.device)
        for index, layer in enumerate(past.layers):
            self.cache.keys[index][:, :, :self.prefix] = layer.keys[:1, :, :self.prefix]
            self.cache.values[index][:, :, :self.prefix] = layer.values[:1, :, :self.prefix]
        self.cache.valid[:, :self.prefix] = True
        self.set_column(self.prefix)

    def static_kv_cache(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return sys.modules[type(base).__module__].StaticKVCache  # the class of the model's own file

    def release(self, row):
        self.cache.valid[row, self.prefix:] = False
        self.cache.positions[row] = 0  # an empty row's positions advance with the others': kept small

    def move(self, source, target):
        cache = self.cache
        for tensor in (*cache.keys, *cache.values, cache.valid, cache.positions):
            tensor[target] = tensor[source]

    def column_tensors(self):
        cache = self.cache
        return [(tensor.transpose(-1, -2), None) for tensor in (*cache.keys, *cache.values)] + [(cache.valid, False)]

    def set_column(self, column):
        self.column = column
        self.cache.slot.fill_(column)

    def step(self, bucket):
        """The step of rows [0, bucket): tokens [bucket, 1] -> logits [bucket, vocab], advancing the shared column."""
        view = copy.copy(self.cache)  # the same buffers, the first `bucket` rows
        view.keys, view.values = [t[:bucket] for t in self.cache.keys], [t[:bucket] for t in self.cache.values]
        view.valid, view.positions = self.cache.valid[:bucket], self.cache.positions[:bucket]
        return self.step_on(view)

    def step_on(self, cache):
        return functools.partial(self.model.static_decode_step, cache=cache)

    def advance(self):
        self.column += 1


class GlmRows(ChatGLMRows):
    """GLM-4's rows: ChatGLM's, on ChatGLM2's StaticKVCache and utils.glm_decode's step, without a prefix; the prompts
    prefilled by the model's forward as NativeRows does."""

    def __init__(self, model, rows, row_tokens):
        self.model, self.rows, self.cache = model, rows, None
        self.prefix = self.column = 0
        self.capacity = row_tokens

    def prefill(self, prompts):
        input_ids, mask = left_padded(prompts, self.model.device)
        logits, past = native_prefill(self.model, input_ids, mask)
        glm_decode.refresh_fused_projections(self.model)
        return logits.float(), past, mask.sum(-1, keepdim=True)  # each prompt's next position, [n, 1]

    def static_kv_cache(self):
        return glm_decode.chatglm2_modeling().StaticKVCache

    def step_on(self, cache):
        return functools.partial(glm_decode.static_decode_step, self.model, cache=cache)


class NativeRows(Rows):
    """The rows on a transformers StaticCache (GLM-4 and the other models transformers runs natively), the mask and
    positions as fixed buffers: a row sees the columns of its own prompt and answer."""

    def __init__(self, model, rows, row_tokens):
        self.model, self.rows, self.capacity, self.cache = model, rows, row_tokens, None
        self.prefix = self.column = 0
        self.cache_kwarg = NativeSteps.cache_kwarg_of(model)

    def prefill(self, prompts):
        input_ids, mask = left_padded(prompts, self.model.device)
        logits, past = native_prefill(self.model, input_ids, mask)
        return logits.float(), past, mask.sum(-1)  # each prompt's length: its next position

    def allocate(self, past, next_positions):
        """The buffers, shaped after the first prefill's keys [n, kv_heads, length, head_dim]."""
        keys = past.layers[0].keys
        device, dtype = keys.device, self.model.dtype
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.capacity)
        self.cache.early_initialization(self.rows, keys.shape[1], keys.shape[3], keys.dtype, device)
        self.blocked = torch.finfo(dtype).min
        self.mask = torch.full((self.rows, 1, 1, self.capacity), self.blocked, dtype=dtype, device=device)
        self.position = torch.zeros(self.rows, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)

    def place(self, row, start, past, index, padding, next_positions):
        for layer, filled in zip(self.cache.layers, past.layers):
            layer.keys[row, :, start:self.column] = filled.keys[index, :, padding:]
            layer.values[row, :, start:self.column] = filled.values[index, :, padding:]
        self.mask[row].fill_(self.blocked)
        self.mask[row, 0, 0, start:self.column] = 0.0
        self.position[row] = next_positions[index]

    def release(self, row):
        self.mask[row].fill_(self.blocked)
        self.position[row] = 0

    def move(self, source, target):
        for tensor in (*(layer.keys for layer in self.cache.layers), *(layer.values for layer in self.cache.layers),
                       self.mask, self.position):
            tensor[target] = tensor[source]

    def column_tensors(self):
        caches = [tensor.transpose(-1, -2) for layer in self.cache.layers for tensor in (layer.keys, layer.values)]
        return [(tensor, None) for tensor in caches] + [(self.mask[:, 0, 0], self.blocked)]

    def set_column(self, column):
        # Where the layers write the next key: the count of the layers (transformers 5.x) and the cache_position
        self.column = column
        self.cache_position.fill_(column)
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(column)

    def step(self, bucket):
        view = copy.copy(self.cache)
        view.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in view.layers:
            layer.keys, layer.values = layer.keys[:bucket], layer.values[:bucket]
        mask, position, cache_position = self.mask[:bucket], self.position[:bucket], self.cache_position

        def forward(tokens):
            mask[:, 0, 0].index_fill_(1, cache_position, 0.0)  # the new token is a key of its own row
            logits = native_step(self.model, self.cache_kwarg, view, tokens, mask, position, cache_position).float()
            position.add_(1)
            cache_position.add_(1)
            return logits

        return forward

    def advance(self):
        self.column += 1

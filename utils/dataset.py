"""Instruction data -> token ids and labels, the official way for each model version.

A record is `{"instruct", "query", "answer"}` (plus optional `"history": [[user, assistant], ...]`), as written by
process.py. The user message is instruct and query joined by a newline. Prompts are built by the same functions
the models' chat() uses, so training and inference see the same text:

- ChatGLM-6B:  prompt + [gMASK] <sop> + answer + <eop>; labels from <sop> on (the loss also predicts <sop>).
- ChatGLM2-6B: [gMASK] sop + "[Round 1]\\n\\n问：...\\n\\n答：" + answer + </s>; labels on answer and </s>.
- ChatGLM3-6B: [gMASK] sop <|user|> \\n message <|assistant|> + \\n answer + </s>; labels after <|assistant|>.
- Other models (e.g. GLM-4, Llama): the tokenizer's chat template; labels on the assistant turn.

Plain text for causal-LM (pre)training is the other format (`TextDataset`): records `{"text"}`, joined with </s> and
cut into blocks, each opened by the tokenizer's prefix ([gMASK] sop for ChatGLM2/3) as every prompt is.
"""
from dataclasses import dataclass

import torch

from utils.data_io import BadLines, DataError, iter_json_lines, require_str
from utils.model_utils import remote_module
from utils.ner_data import QUERY_PREFIX


def user_message(record) -> str:
    return "\n".join(part for part in (record["instruct"], record["query"]) if part)


def source_text(record) -> str:
    """The text an answer is extracted from: the query without process.py's `文本：` prefix. Not the instruction: its
    type names and wording are no entities of the text."""
    return record["query"].removeprefix(QUERY_PREFIX)


def read_instruction_records(path, bad_lines: BadLines = None) -> list:
    """Validated records of an instruction file; bad lines raise DataError (file, line, field) or are counted."""
    bad_lines = bad_lines or BadLines()
    records = []
    for line, record in iter_json_lines(path, bad_lines):
        try:
            instruct = require_str(record, "instruct", path, line, allow_empty=True)
            query = require_str(record, "query", path, line, allow_empty=True)
            if not (instruct.strip() or query.strip()):
                raise DataError(path, line, "instruct and query are both empty", "query")
            answer = require_str(record, "answer", path, line)
            history = record.get("history", [])
            if not (isinstance(history, list) and all(
                isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
            )):
                raise DataError(path, line, "expected a list of [user, assistant] string pairs", "history")
            records.append({"instruct": instruct, "query": query, "answer": answer, "history": [list(t) for t in history], "line": line})
        except DataError as error:
            bad_lines.handle(error)
    if not records:
        raise DataError(path, None, "no usable records")
    return records


class ChatGLMPromptFormat:
    """Prompt and answer ids of ChatGLM-6B / 2-6B / 3-6B, built with the functions their chat() uses."""

    def __init__(self, tokenizer, version):
        self.tokenizer, self.version = tokenizer, version
        if version == "chatglm-6b":
            self.build_v1_prompt = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration.build_prompt
            # The <sop> ending the prompt is also a target: [gMASK] predicts it.
            self.labels_from_prompt_end = 1
        else:
            self.labels_from_prompt_end = 0

    @property
    def stop_token_ids(self):
        if self.version == "chatglm3-6b":
            return [self.tokenizer.eos_token_id, self.tokenizer.get_command("<|user|>"), self.tokenizer.get_command("<|observation|>")]
        return [self.tokenizer.eos_token_id]

    def prompt_ids(self, message, history, system="") -> list:
        """Ids of the prompt that asks for the answer to `message` after the [user, assistant] turns of `history`.
        `system`: ChatGLM3-6B's system turn; ChatGLM-6B and ChatGLM2-6B have none, so it opens the first user message."""
        tokenizer = self.tokenizer
        if system and self.version != "chatglm3-6b":
            if history:
                history = [(f"{system}\n{history[0][0]}", history[0][1]), *history[1:]]
            else:
                message = f"{system}\n{message}"
        if self.version == "chatglm-6b":
            text = self.build_v1_prompt(message, [tuple(turn) for turn in history])
            return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
        if self.version == "chatglm2-6b":
            return tokenizer.encode(tokenizer.build_prompt(message, [tuple(turn) for turn in history]))
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": role, "content": text} for turn in history for role, text in zip(("user", "assistant"), turn)]
        return tokenizer.build_chat_input(message, history=messages)["input_ids"][0].tolist()

    def answer_parts(self, answer):
        """(content ids, closing ids) of the answer turn; truncation cuts only the content."""
        if self.version == "chatglm3-6b":
            # What the model writes after <|assistant|>: an empty metadata line, then the content.
            content = self.tokenizer.build_single_message("assistant", "", answer)[1:]
        else:
            content = self.tokenizer.encode(answer, add_special_tokens=False)
        return content, [self.tokenizer.eos_token_id]


class ChatTemplatePromptFormat:
    """Models that transformers supports natively: their tokenizer's chat template."""

    labels_from_prompt_end = 0

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{type(tokenizer).__name__} has no chat_template; cannot build prompts for this model")
        self.tokenizer = tokenizer

    @property
    def stop_token_ids(self):
        return [self.tokenizer.eos_token_id]

    def _ids(self, messages, generation_prompt):
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    @staticmethod
    def _messages(message, history, system=""):
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": r, "content": t} for turn in history for r, t in zip(("user", "assistant"), turn)
        ] + [{"role": "user", "content": message}]

    def prompt_ids(self, message, history, system="") -> list:
        return self._ids(self._messages(message, history, system), generation_prompt=True)

    def answer_parts(self, answer):
        """The assistant turn as the template renders it after a generation prompt: (content ids, the trailing
        special tokens that close the turn), so that the model learns to end its turn the template's way."""
        messages = self._messages("", [])
        prompt = self._ids(messages, generation_prompt=True)
        full = self._ids(messages + [{"role": "assistant", "content": answer}], generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently once an answer follows; cannot mask labels")
        tail = full[len(prompt):]
        special = set(self.tokenizer.all_special_ids)
        split = len(tail)
        while split and tail[split - 1] in special:
            split -= 1
        return tail[:split], tail[split:]


def get_prompt_format(tokenizer, version=None):
    """The prompt format of a ChatGLM version, or the chat template of any other model's tokenizer."""
    if version in ("chatglm-6b", "chatglm2-6b", "chatglm3-6b"):
        return ChatGLMPromptFormat(tokenizer, version)
    return ChatTemplatePromptFormat(tokenizer)


def fit_prompt(prompt_format, message, history, max_length):
    """Prompt ids of at most max_length tokens: oldest history turns go first, then the message's tail.
    Returns (ids, truncated)."""
    ids = prompt_format.prompt_ids(message, history)
    if len(ids) <= max_length:
        return ids, False
    while history and len(ids) > max_length:
        history = history[1:]
        ids = prompt_format.prompt_ids(message, history)
    message_ids = prompt_format.tokenizer.encode(message, add_special_tokens=False)
    keep = len(message_ids) - (len(ids) - max_length)
    while len(ids) > max_length:
        if keep <= 0:
            raise ValueError(f"max_source_length={max_length} is shorter than the prompt template itself")
        ids = prompt_format.prompt_ids(prompt_format.tokenizer.decode(message_ids[:keep]), history)
        keep -= 1
    return ids, True


def encode_example(record, prompt_format, max_source_length, max_target_length):
    """input_ids and labels (-100 on the prompt) of one record, plus which parts were truncated."""
    prompt, prompt_cut = fit_prompt(prompt_format, user_message(record), record.get("history", []), max_source_length)
    content, closing = prompt_format.answer_parts(record["answer"])
    answer_cut = len(content) > max_target_length
    answer = content[:max_target_length] + closing
    masked = len(prompt) - prompt_format.labels_from_prompt_end
    input_ids = prompt + answer
    labels = [-100] * masked + input_ids[masked:]
    return {"input_ids": input_ids, "labels": labels}, prompt_cut, answer_cut


class EncodedDataset(torch.utils.data.Dataset):
    """Examples encoded once at load time ({input_ids, labels}), with `stats` and the skipped-lines summary."""

    examples: list
    skipped_summary: str

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def with_skipped(self, text):
        return text + ("\n" + self.skipped_summary if self.stats["skipped_lines"] else "")


class InstructionDataset(EncodedDataset):
    """A whole instruction file, encoded once. `stats` counts samples, truncations and skipped lines."""

    def __init__(self, path, tokenizer, version=None, max_source_length=512, max_target_length=256, skip_bad_lines=False):
        bad_lines = BadLines(skip=skip_bad_lines)
        records = read_instruction_records(path, bad_lines)
        prompt_format = get_prompt_format(tokenizer, version)
        self.examples, cut_prompts, cut_answers = [], 0, 0
        for record in records:
            example, prompt_cut, answer_cut = encode_example(record, prompt_format, max_source_length, max_target_length)
            self.examples.append(example)
            cut_prompts += prompt_cut
            cut_answers += answer_cut
        self.stats = {
            "file": str(path),
            "samples": len(self.examples),
            "truncated_prompts": cut_prompts,
            "truncated_answers": cut_answers,
            "skipped_lines": bad_lines.count,
            "tokens": sum(len(e["input_ids"]) for e in self.examples),
        }
        self.skipped_summary = bad_lines.summary()

    def describe(self):
        s = self.stats
        return self.with_skipped(f"{s['file']}: {s['samples']} samples, {s['tokens']} tokens; truncated prompts "
                                 f"{s['truncated_prompts']} (max_source_length), truncated answers {s['truncated_answers']} "
                                 "(max_target_length)")


def read_text_records(path, bad_lines: BadLines = None) -> list:
    """The text of every record `{"text": ...}` of a JSON-lines file; bad lines raise DataError or are counted."""
    bad_lines = bad_lines or BadLines()
    texts = []
    for line, record in iter_json_lines(path, bad_lines):
        try:
            texts.append(require_str(record, "text", path, line))
        except DataError as error:
            bad_lines.handle(error)
    if not texts:
        raise DataError(path, None, "no usable records")
    return texts


class TextDataset(EncodedDataset):
    """Plain text for causal-LM training: every record's tokens followed by </s>, all of them in file order, cut into
    blocks of `block_size` tokens. Each block starts with the tokenizer's prefix (ChatGLM2/3: [gMASK] sop), which
    carries no label; every other token is a target. Nothing is dropped: the last block is just shorter."""

    def __init__(self, path, tokenizer, block_size=512, skip_bad_lines=False):
        bad_lines = BadLines(skip=skip_bad_lines)
        texts = read_text_records(path, bad_lines)
        prefix = tokenizer.build_inputs_with_special_tokens([])
        if block_size <= len(prefix):
            raise ValueError(f"block_size={block_size}: must exceed the {len(prefix)} prefix tokens")
        stream = []
        for text in texts:
            stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        step = block_size - len(prefix)
        self.examples = [
            {"input_ids": prefix + stream[start:start + step], "labels": [-100] * len(prefix) + stream[start:start + step]}
            for start in range(0, len(stream), step)
        ]
        self.stats = {
            "file": str(path),
            "records": len(texts),
            "samples": len(self.examples),
            "text_tokens": len(stream),
            "skipped_lines": bad_lines.count,
            "tokens": sum(len(e["input_ids"]) for e in self.examples),
        }
        self.skipped_summary = bad_lines.summary()

    def describe(self):
        s = self.stats
        return self.with_skipped(f"{s['file']}: {s['records']} texts, {s['text_tokens']} tokens (with </s>) in {s['samples']} blocks")


@dataclass
class PaddingCollator:
    """Pads a batch to its longest example (dynamic padding). Training pads on the right: the ChatGLM models take
    positions from the attention mask, and natively supported models count positions from the first token."""

    pad_token_id: int
    pad_to_multiple_of: int = 1
    padding_side: str = "right"

    def __call__(self, features):
        longest = max(len(f["input_ids"]) for f in features)
        longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature in features:
            pad = longest - len(feature["input_ids"])
            # A packed row (PackedDataset) brings its own mask: segment ids 1, 2, 3, ... (padding stays 0).
            rows = (feature["input_ids"], feature.get("attention_mask") or [1] * len(feature["input_ids"]), feature.get("labels"))
            fills = (self.pad_token_id, 0, -100)
            for key, row, fill in zip(batch, rows, fills):
                if row is None:
                    continue
                batch[key].append(row + [fill] * pad if self.padding_side == "right" else [fill] * pad + row)
        return {key: torch.tensor(rows) for key, rows in batch.items() if rows}


def pack_lengths(lengths, budget, seed=0):
    """Rows of example indices, each holding at most `budget` tokens (an example longer than that gets a row of its
    own): first-fit decreasing (longest first, each into the first row with room), which fills rows best; ties in
    length are broken in an order shuffled with `seed`. The rows come out shuffled with `seed`, the examples of a row
    in the order they were placed."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order.sort(key=lambda i: -lengths[i])
    rows, room = [], []
    for i in order:
        # The first row with room: a linear scan, fine for the data sizes here (rows are few and fill up fast).
        row = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if row is None:
            rows.append([i])
            room.append(budget - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    return [rows[r] for r in torch.randperm(len(rows), generator=generator).tolist()]


def pack_examples(examples):
    """One row of several encoded examples: input_ids and labels concatenated, attention_mask the segment ids
    1, 2, 3, ... of the examples (the convention the ChatGLM models read, see build_attention_mask; for native models
    `packed_inputs_hook` turns it into restarting position_ids). Each example keeps its labels, except that the first
    token of each is never a target: an example's first label is never predicted unpacked either (the loss shifts
    labels by one), and packed it would make the last token of the previous example predict across the boundary."""
    row = {"input_ids": [], "labels": [], "attention_mask": []}
    for segment, example in enumerate(examples, start=1):
        row["input_ids"] += example["input_ids"]
        row["labels"] += [-100] + example["labels"][1:]
        row["attention_mask"] += [segment] * len(example["input_ids"])
    return row


class PackedDataset(torch.utils.data.Dataset):
    """Encoded examples packed several to a row of at most `pack_tokens` tokens (pack_lengths), once, at load time
    with the run's seed; the sampler shuffles the rows each epoch. Each example attends only to itself (see
    pack_examples), so a packed step trains as the same examples unpacked: the training scripts divide the summed
    token losses by the number of target tokens in the step, which packing does not change. A batch then holds
    `per_device_train_batch_size` rows, each of several examples. `stats`: the data's, plus rows and fill ratio."""

    def __init__(self, data: EncodedDataset, pack_tokens: int, seed=0):
        if pack_tokens <= 0:
            raise ValueError(f"pack_tokens={pack_tokens}: must be positive")
        self.data, self.pack_tokens = data, pack_tokens
        lengths = [len(example["input_ids"]) for example in data.examples]
        self.rows = pack_lengths(lengths, pack_tokens, seed)
        tokens = sum(lengths)
        self.stats = {**data.stats, "pack_tokens": pack_tokens, "packed_rows": len(self.rows),
                      "fill_ratio": round(tokens / (len(self.rows) * pack_tokens), 4),
                      "longer_than_pack_tokens": sum(length > pack_tokens for length in lengths)}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return pack_examples([self.data.examples[i] for i in self.rows[index]])

    def describe(self):
        s = self.stats
        text = (f"packing: {s['samples']} samples in {s['packed_rows']} rows of at most {s['pack_tokens']} tokens "
                f"(fill ratio {s['fill_ratio']:.1%})")
        if s["longer_than_pack_tokens"]:
            text += f"; {s['longer_than_pack_tokens']} samples are longer than pack_tokens and have a row each"
        return text


def packed_inputs_hook(module, args, kwargs):
    """Forward pre-hook (with_kwargs) for models that transformers supports natively: a packed batch's mask of
    segment ids becomes position_ids that restart at each example, and no attention_mask. transformers then finds
    the packed sequences from the positions (masking_utils.find_packed_sequence_indices, used when there is neither
    mask nor cache) and builds a block-diagonal causal mask, for sdpa and eager attention alike. A 0/1 mask passes."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2 or not bool((mask > 1).any()):
        return args, kwargs
    index = torch.arange(mask.shape[-1], device=mask.device)
    new = torch.ones_like(mask, dtype=torch.bool)
    new[:, 1:] = mask[:, 1:] != mask[:, :-1]
    kwargs = {**kwargs, "attention_mask": None, "use_cache": False,
              "position_ids": index - torch.where(new, index, 0).cummax(-1).values}
    return args, kwargs

"""Instruction data -> token ids and labels, the official way for each model version.

A record is `{"instruct", "query", "answer"}` (plus optional `"history": [[user, assistant], ...]`), as written by
process.py. The user message is instruct and query joined by a newline. Prompts are built by the same functions
the models' chat() uses, so training and inference see the same text:

- ChatGLM-6B:  prompt + [gMASK] <sop> + answer + <eop>; labels from <sop> on (the loss also predicts <sop>).
- ChatGLM2-6B: [gMASK] sop + "[Round 1]\\n\\n问：...\\n\\n答：" + answer + </s>; labels on answer and </s>.
- ChatGLM3-6B: [gMASK] sop <|user|> \\n message <|assistant|> + \\n answer + </s>; labels after <|assistant|>.
- Other models (e.g. GLM-4, Llama): the tokenizer's chat template; labels on the assistant turn.

Multi-turn data: an instruction record's `history` answers are context only, unless `loss_on_all_turns` makes every
answer a target. A ChatGLM3 conversation record (`{"conversations": [...]}`, utils/conversations.py: tool calls and
observations too) learns every assistant message that does not say `"loss": false`. On ChatGLM3-6B a multi-turn
sample is one sequence laid out as ChatGLM3's finetune_demo does (encode_chatglm3_conversation): every message is
encoded on its own there, so each turn's prompt in it is exactly what chat() builds for that turn. ChatGLM-6B and
ChatGLM2-6B re-encode the whole history text at every turn (an answer's tokens differ inside the later prompts, and no
</s> follows it there), and ChatGLM-6B's prompt is bidirectional, so one sequence cannot hold every turn as chat()
sees it: each learnt answer becomes a sample of its own, its exact chat() prompt + answer (turn_records), as for
chat-template models.

Plain text for causal-LM (pre)training is the other format (`TextDataset`): records `{"text"}`, joined with </s> and
cut into blocks, each opened by the tokenizer's prefix ([gMASK] sop for ChatGLM2/3) as every prompt is.
"""
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.conversations import conversation_messages, plain_turns
from utils.data_io import BadLines, DataError, iter_json_lines, require_str
from utils.model_loading import remote_module
from utils.ner_data import QUERY_PREFIX


def user_message(record) -> str:
    return "\n".join(part for part in (record["instruct"], record["query"]) if part)


def source_text(record) -> str:
    """The text an answer is extracted from: the query without process.py's `文本：` prefix. Not the instruction: its
    type names and wording are no entities of the text."""
    return record["query"].removeprefix(QUERY_PREFIX)


def read_instruction_records(path, bad_lines: BadLines = None, conversations=False) -> list:
    """Validated records of an instruction file; bad lines raise DataError (file, line, field) or are counted.
    conversations: ChatGLM3 conversation records are read too, as {"conversations": messages, "line"} (training)."""
    bad_lines = bad_lines or BadLines()
    records = []
    for line, record in iter_json_lines(path, bad_lines):
        try:
            if isinstance(record, dict) and "messages" in record and "conversations" not in record:
                raise DataError(path, line, "an OpenAI messages record; the training scripts read ChatGLM3 conversation "
                                "records: convert the file with process.py (--input_format=conversation)", "messages",
                                "an OpenAI messages record (convert it with process.py)")
            if isinstance(record, dict) and "conversations" in record:
                if not conversations:
                    raise DataError(path, line, "a conversation record; this reads instruction records {instruct, "
                                    "query, answer}", "conversations", "a conversation record")
                messages = conversation_messages(record, path, line, chatglm3_only=True)
                records.append({"conversations": messages, "line": line})
                continue
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
    """Models that transformers supports natively (GLM-4, Llama...): their tokenizer's chat template.

    The answer turn ends with the special tokens the template writes after an assistant message; a template that
    writes none there (GLM-4's) ends it with the role token that opens the next turn (<|user|>, as GLM-4's own
    finetuning appends). Generation stops at those, the tokenizer's eos and the model folder's generation_config
    eos ids (GLM-4: <|endoftext|>, <|user|>, <|observation|>)."""

    labels_from_prompt_end = 0
    version = None

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{type(tokenizer).__name__} has no chat_template; cannot build prompts for this model")
        self.tokenizer = tokenizer
        self.turn_end = self._turn_end()
        ids = [tokenizer.eos_token_id, *self.turn_end, *folder_eos_ids(tokenizer.name_or_path)]
        self.stop_token_ids = list(dict.fromkeys(i for i in ids if i is not None))

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

    def _rendered_answer(self, answer):
        """Ids after the generation prompt once `answer` follows it (a placeholder question: some templates skip
        empty messages)."""
        messages = self._messages("x", [])
        prompt = self._ids(messages, generation_prompt=True)
        full = self._ids(messages + [{"role": "assistant", "content": answer}], generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently once an answer follows; cannot mask labels")
        return messages, full, full[len(prompt):]

    def _turn_end(self):
        messages, full, tail = self._rendered_answer("x")
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}  # the placeholder may be unknown
        closing = list(itertools.takewhile(lambda i: i in special, reversed(tail)))[::-1]
        if closing:
            return closing
        longer = self._ids(messages + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "x"}], generation_prompt=False)
        following = longer[len(full): len(full) + 1]
        return following if following and following[0] in special else [self.tokenizer.eos_token_id]

    def answer_parts(self, answer):
        """(content ids, the ids that close the turn): the assistant turn as the template renders it after a
        generation prompt, so that the model learns to end its turn the template's way."""
        _, _, tail = self._rendered_answer(answer)
        content = tail[: len(tail) - len(self.turn_end)]
        # The template wrote the turn end itself (Llama-style), or none (GLM-4: the next turn's role token is added).
        return (content if tail[len(content):] == self.turn_end else tail), self.turn_end


def folder_eos_ids(model_dir) -> list:
    """eos_token_id of a model folder's generation_config.json (else config.json), as a list; [] if there is none."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir or "") / name
        if model_dir and path.is_file():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
    return []


def get_prompt_format(tokenizer, version=None):
    """The prompt format of a ChatGLM version, or the chat template of any other model's tokenizer."""
    if version in ("chatglm-6b", "chatglm2-6b", "chatglm3-6b"):
        return ChatGLMPromptFormat(tokenizer, version)
    return ChatTemplatePromptFormat(tokenizer)


def fit_turns(build, tokenizer, message, history, max_length):
    """The prompt build(message, history) in at most max_length ids: the oldest history entries go first, then the
    message's tail. Returns (ids, message, history, truncated), the message and history as kept."""
    ids = build(message, history)
    if len(ids) <= max_length:
        return ids, message, history, False
    while history and len(ids) > max_length:
        history = history[1:]
        ids = build(message, history)
    message_ids = tokenizer.encode(message, add_special_tokens=False)
    keep = len(message_ids) - (len(ids) - max_length)
    while len(ids) > max_length:
        if keep <= 0:
            raise ValueError(f"max_source_length={max_length} is shorter than the prompt template itself")
        message = tokenizer.decode(message_ids[:keep])
        ids = build(message, history)
        keep -= 1
    return ids, message, history, True


def fit_prompt(prompt_format, message, history, max_length, system=""):
    """Prompt ids of at most max_length tokens: oldest history turns go first, then the message's tail.
    Returns (ids, truncated)."""
    ids, _, _, truncated = fit_turns(lambda text, turns: prompt_format.prompt_ids(text, turns, system),
                                     prompt_format.tokenizer, message, history, max_length)
    return ids, truncated


def encode_example(record, prompt_format, max_source_length, max_target_length):
    """input_ids and labels (-100 on the prompt) of one record, plus which parts were truncated. A record made by
    turn_records may carry a `system` text."""
    prompt, prompt_cut = fit_prompt(prompt_format, user_message(record), record.get("history", []), max_source_length,
                                    record.get("system", ""))
    content, closing = prompt_format.answer_parts(record["answer"])
    answer_cut = len(content) > max_target_length
    answer = content[:max_target_length] + closing
    masked = len(prompt) - prompt_format.labels_from_prompt_end
    input_ids = prompt + answer
    labels = [-100] * masked + input_ids[masked:]
    return {"input_ids": input_ids, "labels": labels}, prompt_cut, answer_cut


def turn_records(system, turns):
    """One instruction record per learnt answer of plain turns [(user, assistant, learnt)]: that turn's question with
    the turns before it as history, i.e. exactly what chat() is given at that turn."""
    records, history = [], []
    for user, assistant, learnt in turns:
        if learnt:
            records.append({"instruct": "", "query": user, "answer": assistant, "history": list(history), "system": system})
        history.append([user, assistant])
    return records


def history_messages(record):
    """An instruction record's turns as ChatGLM3 messages, every answer learnt."""
    turns = [*record["history"], (user_message(record), record["answer"])]
    return [{"role": role, "content": text} for turn in turns for role, text in zip(("user", "assistant"), turn)]


def learnt(message):
    return message["role"] == "assistant" and message.get("loss", True)


def encode_chatglm3_conversation(tokenizer, messages, max_source_length, max_target_length):
    """input_ids and labels of a ChatGLM3 conversation, laid out as ChatGLM3's finetune_demo does: [gMASK] sop, every
    message as the chat input has it (the tokenizer's build_message), then </s>.

    Targets: every learnt assistant message after its role token, and the one token that follows the message: the
    next message's role token, or </s> at the end. That token ends the turn at inference (chat() stops at </s>,
    <|user|> and <|observation|>; between two parts of one answer the model writes <|assistant|>), and it is learnt
    as the single-turn encoding (encode_example) learns its </s>: a one-turn conversation gives the same ids and labels
    either way. Labels equal the ids at the targets; the model shifts them.

    Truncation as fit_prompt: the prompt (all before the last message's content) fits max_source_length by dropping
    the oldest rounds (a user message and all up to the next one; the system message stays), then the tail of the
    last round's user message; the last message's content is cut to max_target_length. Earlier answers are never cut:
    the later turns see them whole. Returns (example, prompt cut, answer cut, learnt answers dropped with their
    rounds)."""
    # The system messages: one, or the finetune_demo's tool prompt and then the data's own.
    system = list(itertools.takewhile(lambda message: message["role"] == "system", messages))
    rest = messages[len(system):]  # a user message first (utils/conversations.py checks the order)
    starts = [i for i, message in enumerate(rest) if message["role"] == "user"]
    *history, last_round = [rest[a:b] for a, b in zip(starts, starts[1:] + [len(rest)])]
    user, middle, last = last_round[0], last_round[1:-1], last_round[-1]
    prefix = tokenizer.build_inputs_with_special_tokens([])  # [gMASK] sop

    def arrange(message, rounds):
        return system + [m for kept in rounds for m in kept] + [{**user, "content": message}] + middle

    def prompt(message, rounds):
        ids = prefix + [i for m in arrange(message, rounds) for i in tokenizer.build_message(m)]
        return ids + tokenizer.build_message(last)[:1]  # the last message's role token

    _, message, rounds, prompt_cut = fit_turns(prompt, tokenizer, user["content"], history, max_source_length)
    dropped = sum(learnt(m) for gone in history[:len(history) - len(rounds)] for m in gone)
    input_ids, spans = list(prefix), []
    for m in arrange(message, rounds):
        ids = tokenizer.build_message(m)
        if learnt(m):
            spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids += ids
    role, *content = tokenizer.build_message(last)
    if learnt(last):
        spans.append((len(input_ids), len(input_ids) + 1 + min(len(content), max_target_length)))
    input_ids += [role] + content[:max_target_length] + [tokenizer.eos_token_id]
    labels = [-100] * len(input_ids)
    for start, end in spans:
        labels[start + 1:end + 1] = input_ids[start + 1:end + 1]  # after the role token, through the next token
    return {"input_ids": input_ids, "labels": labels}, prompt_cut, len(content) > max_target_length, dropped


def encode_record(record, prompt_format, max_source_length, max_target_length, loss_on_all_turns=False, path=""):
    """The samples of one record (an instruction or a conversation record) and its counts: (samples, truncated
    prompts, truncated answers, learnt answers dropped with the oldest rounds). See the module docstring for the
    multi-turn layouts; a conversation that only ChatGLM3-6B can express raises DataError on other models."""
    multi_turn = "conversations" in record or (loss_on_all_turns and record.get("history"))
    if not multi_turn:
        example, prompt_cut, answer_cut = encode_example(record, prompt_format, max_source_length, max_target_length)
        return [example], int(prompt_cut), int(answer_cut), 0
    if prompt_format.version == "chatglm3-6b":
        messages = record.get("conversations") or history_messages(record)
        try:
            example, prompt_cut, answer_cut, dropped = encode_chatglm3_conversation(
                prompt_format.tokenizer, messages, max_source_length, max_target_length)
        except ValueError:  # what must stay (system and tools, the last round's calls and observations) is too long
            raise DataError(path, record["line"], f"longer than max_source_length={max_source_length} even with only "
                            "the last round left and its user message cut", "conversations",
                            "longer than max_source_length") from None
        return [example], int(prompt_cut), int(answer_cut), dropped
    if "conversations" in record:
        turns = plain_turns(record["conversations"])
        if turns is None:
            raise DataError(path, record["line"], f"tool calls, observations and consecutive assistant messages need "
                            f"ChatGLM3-6B; {prompt_format.version or 'this model'} learns alternating user and "
                            "assistant turns", "conversations", "a conversation that needs ChatGLM3-6B")
        system, turns = turns
    else:
        system = ""
        turns = [(user, assistant, True) for user, assistant in record["history"]] + [(user_message(record), record["answer"], True)]
    samples, prompt_cuts, answer_cuts = [], 0, 0
    for turn in turn_records(system, turns):
        example, prompt_cut, answer_cut = encode_example(turn, prompt_format, max_source_length, max_target_length)
        samples.append(example)
        prompt_cuts += prompt_cut
        answer_cuts += answer_cut
    return samples, prompt_cuts, answer_cuts, 0


def format_example(example, tokenizer) -> str:
    """An encoded sample as text, to check a data format by eye: one line per run of tokens in the loss (`loss`) or
    not (`----`), each token as its piece and id. A target whose label is not its own id (no layout here makes one)
    shows `->label`."""
    ids, labels = example["input_ids"], example["labels"]
    lines = [f"{len(ids)} tokens, {sum(label != -100 for label in labels)} of them in the loss"]
    tokens = zip(tokenizer.convert_ids_to_tokens(ids), ids, labels)
    for in_loss, run in itertools.groupby(tokens, key=lambda token: token[2] != -100):
        shown = ", ".join(f"{piece!r} {i}" + (f"->{label}" if in_loss and label != i else "") for piece, i, label in run)
        lines.append(f"{'loss' if in_loss else '----'}  {shown}")
    return "\n".join(lines)


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
    """A whole instruction file (conversation records too), encoded once. `stats` counts records, samples,
    truncations and skipped lines. loss_on_all_turns: every answer of a record's history is a target too."""

    def __init__(self, path, tokenizer, version=None, max_source_length=512, max_target_length=256, skip_bad_lines=False,
                 loss_on_all_turns=False):
        bad_lines = BadLines(skip=skip_bad_lines)
        records = read_instruction_records(path, bad_lines, conversations=True)
        prompt_format = get_prompt_format(tokenizer, version)
        self.examples, encoded, cut_prompts, cut_answers, dropped = [], 0, 0, 0, 0
        for record in records:
            try:
                examples, prompt_cuts, answer_cuts, dropped_answers = encode_record(
                    record, prompt_format, max_source_length, max_target_length, loss_on_all_turns, path)
            except DataError as error:
                bad_lines.handle(error)
                continue
            self.examples += examples
            encoded += 1
            cut_prompts += prompt_cuts
            cut_answers += answer_cuts
            dropped += dropped_answers
        if not self.examples:
            raise DataError(path, None, "no usable records")
        self.stats = {
            "file": str(path),
            "records": encoded,
            "samples": len(self.examples),
            "truncated_prompts": cut_prompts,
            "truncated_answers": cut_answers,
            "dropped_answers": dropped,
            "skipped_lines": bad_lines.count,
            "tokens": sum(len(e["input_ids"]) for e in self.examples),
        }
        self.skipped_summary = bad_lines.summary()

    def describe(self):
        s = self.stats
        samples = f"{s['samples']} samples" + (f" from {s['records']} records (one per learnt answer)"
                                               if s["samples"] != s["records"] else "")
        text = (f"{s['file']}: {samples}, {s['tokens']} tokens; truncated prompts {s['truncated_prompts']} "
                f"(max_source_length), truncated answers {s['truncated_answers']} (max_target_length)")
        if s["dropped_answers"]:
            text += f"; learnt answers left out with the oldest turns {s['dropped_answers']} (max_source_length)"
        return self.with_skipped(text)


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
        # A sample longer than the budget is never cut: it fills a row of its own, which counts as full.
        capacity = sum(max(pack_tokens, sum(lengths[i] for i in row)) for row in self.rows)
        self.stats = {**data.stats, "pack_tokens": pack_tokens, "packed_rows": len(self.rows),
                      "fill_ratio": round(sum(lengths) / capacity, 4) if capacity else 0.0,
                      "longer_than_pack_tokens": sum(length > pack_tokens for length in lengths),
                      "longest_sample": max(lengths, default=0)}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return pack_examples([self.data.examples[i] for i in self.rows[index]])

    def describe(self):
        s = self.stats
        text = (f"packing: {s['samples']} samples in {s['packed_rows']} rows of at most {s['pack_tokens']} tokens "
                f"(fill ratio {s['fill_ratio']:.1%})")
        if s["longer_than_pack_tokens"]:
            text += (f"; {s['longer_than_pack_tokens']} samples are longer than --pack_tokens={s['pack_tokens']} (the "
                     f"longest {s['longest_sample']} tokens): each has a row of its own, whole, so a row can be that long")
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

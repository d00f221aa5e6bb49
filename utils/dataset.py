"""Records -> token ids and labels (utils/prompts.py builds the prompts), collators and packing. Multi-turn data as
README "Multi-turn conversations and tool calls" says: one sequence on ChatGLM3-6B (encode_chatglm3_conversation);
the other models re-encode the history at every turn, so each learnt answer is a sample of its own (turn_records).
"""
import itertools
from dataclasses import dataclass

import torch

from utils.chat_data import plain_turns
from utils.data_io import BadLines, DataError
from utils.prompts import chat_messages, fit_prompt, fit_turns, get_prompt_format, user_message
from utils.records import read_instruction_records, read_text_records


def encode_example(record, prompt_format, max_source_length, max_target_length):
    """(input_ids and labels (-100 on the prompt), prompt cut, answer cut) of one record (`system`: turn_records')."""
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


def learnt(message):
    return message["role"] == "assistant" and message.get("loss", True)


def encode_chatglm3_conversation(tokenizer, messages, max_source_length, max_target_length):
    """(input_ids and labels, prompt cut, answer cut, learnt answers dropped with their rounds) of a ChatGLM3
    conversation laid out and learnt as the README says; only the last message's content is cut to max_target_length."""
    # The system messages: one, or the finetune_demo's tool prompt and then the data's own.
    system = list(itertools.takewhile(lambda message: message["role"] == "system", messages))
    rest = messages[len(system):]  # a user message first (utils/chat_data.py checks the order)
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
    """(samples, truncated prompts, truncated answers, learnt answers dropped with the oldest rounds) of one record;
    a conversation that only ChatGLM3-6B can express raises DataError on other models."""
    if "conversations" not in record and not (loss_on_all_turns and record.get("history")):
        example, prompt_cut, answer_cut = encode_example(record, prompt_format, max_source_length, max_target_length)
        return [example], int(prompt_cut), int(answer_cut), 0
    pairs = None if "conversations" in record else [*record["history"], (user_message(record), record["answer"])]
    if prompt_format.version == "chatglm3-6b":
        try:
            example, prompt_cut, answer_cut, dropped = encode_chatglm3_conversation(
                prompt_format.tokenizer, record.get("conversations") or chat_messages(pairs), max_source_length,
                max_target_length)
        except ValueError:  # what must stay (system and tools, the last round's calls and observations) is too long
            raise DataError(path, record["line"], f"longer than max_source_length={max_source_length} even with only "
                            "the last round left and its user message cut", "conversations",
                            "longer than max_source_length") from None
        return [example], int(prompt_cut), int(answer_cut), dropped
    plain = ("", [(*pair, True) for pair in pairs]) if pairs else plain_turns(record["conversations"])
    if plain is None:
        raise DataError(path, record["line"], f"tool calls, observations and consecutive assistant messages need "
                        f"ChatGLM3-6B; {prompt_format.version or 'this model'} learns alternating user and "
                        "assistant turns", "conversations", "a conversation that needs ChatGLM3-6B")
    encoded = [encode_example(turn, prompt_format, max_source_length, max_target_length)
               for turn in turn_records(*plain)]
    return [e for e, _, _ in encoded], sum(cut for _, cut, _ in encoded), sum(cut for _, _, cut in encoded), 0


def format_example(example, tokenizer) -> str:
    """An encoded sample as text, to check by eye: a line per run of tokens in the loss (`loss`) or not (`----`)."""
    ids, labels = example["input_ids"], example["labels"]
    lines = [f"{len(ids)} tokens, {sum(label != -100 for label in labels)} of them in the loss"]
    tokens = zip(tokenizer.convert_ids_to_tokens(ids), ids, labels)
    for in_loss, run in itertools.groupby(tokens, key=lambda token: token[2] != -100):
        shown = ", ".join(f"{piece!r} {i}" + (f"->{label}" if in_loss and label != i else "") for piece, i, label in run)
        lines.append(f"{'loss' if in_loss else '----'}  {shown}")
    return "\n".join(lines)


class EncodedDataset(torch.utils.data.Dataset):
    """Examples encoded once at load time ({input_ids, labels}), with `stats` and the skipped-lines summary."""

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def with_skipped(self, text):
        return text + ("\n" + self.skipped_summary if self.stats["skipped_lines"] else "")

    def count(self, path, bad_lines, records, **counts):
        if not self.examples:
            raise DataError(path, None, "no usable records")
        self.stats = {"file": str(path), "records": records, "samples": len(self.examples), **counts,
                      "skipped_lines": bad_lines.count, "tokens": sum(len(e["input_ids"]) for e in self.examples)}
        self.skipped_summary = bad_lines.summary()


class InstructionDataset(EncodedDataset):
    """A whole instruction file (conversation records too), encoded once."""

    def __init__(self, path, tokenizer, version=None, max_source_length=512, max_target_length=256, skip_bad_lines=False,
                 loss_on_all_turns=False):
        bad_lines = BadLines(skip=skip_bad_lines)
        prompt_format = get_prompt_format(tokenizer, version)
        records = ((record["line"], record) for record in read_instruction_records(path, bad_lines, conversations=True))
        self.examples, counts = [], []
        for _, (examples, *record_counts) in bad_lines.kept(records, lambda _, record: encode_record(
                record, prompt_format, max_source_length, max_target_length, loss_on_all_turns, path)):
            self.examples += examples
            counts.append(record_counts)
        cut_prompts, cut_answers, dropped = (sum(column) for column in zip(*counts or [(0, 0, 0)]))
        self.count(path, bad_lines, len(counts), truncated_prompts=cut_prompts, truncated_answers=cut_answers,
                   dropped_answers=dropped)

    def describe(self):
        s = self.stats
        samples = f"{s['samples']} samples" + (f" from {s['records']} records (one per learnt answer)"
                                               if s["samples"] != s["records"] else "")
        text = (f"{s['file']}: {samples}, {s['tokens']} tokens; truncated prompts {s['truncated_prompts']} "
                f"(max_source_length), truncated answers {s['truncated_answers']} (max_target_length)")
        if s["dropped_answers"]:
            text += f"; learnt answers left out with the oldest turns {s['dropped_answers']} (max_source_length)"
        return self.with_skipped(text)


class TextDataset(EncodedDataset):
    """Plain text records `{"text"}` for causal-LM training: each followed by </s>, in file order, cut into blocks of
    `block_size` tokens, each opened by the tokenizer's prefix (ChatGLM2/3: [gMASK] sop) with no label on it."""

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
        self.count(path, bad_lines, len(texts), text_tokens=len(stream))

    def describe(self):
        s = self.stats
        return self.with_skipped(f"{s['file']}: {s['records']} texts, {s['text_tokens']} tokens (with </s>) in {s['samples']} blocks")


@dataclass
class PaddingCollator:
    """Pads a batch to its longest example. Training pads on the right: the ChatGLM models take positions from the
    attention mask, and natively supported models count positions from the first token."""

    pad_token_id: int
    padding_side: str = "right"
    multiple: int = 1  # pad to a multiple of this many tokens (graphed blocks: one capture per shape)

    def __call__(self, features):
        longest = max(len(f["input_ids"]) for f in features)
        longest = -(-longest // self.multiple) * self.multiple
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature in features:
            pad = longest - len(feature["input_ids"])
            # A packed row (PackedDataset) brings its own mask: segment ids 1, 2, 3, ... (padding stays 0).
            rows = (feature["input_ids"], feature.get("attention_mask") or [1] * len(feature["input_ids"]), feature.get("labels"))
            for key, row, fill in zip(batch, rows, (self.pad_token_id, 0, -100)):
                if row is None:
                    continue
                batch[key].append(row + [fill] * pad if self.padding_side == "right" else [fill] * pad + row)
        return {key: torch.tensor(rows) for key, rows in batch.items() if rows}


def pack_lengths(lengths, budget, seed=0):
    """Rows of example indices of at most `budget` tokens each (a longer example gets a row of its own), by first-fit
    decreasing; ties in length and the order of the rows are shuffled with `seed`."""
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
    """One row of several encoded examples, attention_mask their segment ids 1, 2, 3, ... The first token of each
    example is no target: unpacked it is never predicted either, packed the previous example would predict it."""
    row = {"input_ids": [], "labels": [], "attention_mask": []}
    for segment, example in enumerate(examples, start=1):
        row["input_ids"] += example["input_ids"]
        row["labels"] += [-100] + example["labels"][1:]
        row["attention_mask"] += [segment] * len(example["input_ids"])
    return row


class PackedDataset(torch.utils.data.Dataset):
    """Encoded examples packed several to a row of at most `pack_tokens` tokens (pack_lengths). Each example attends
    only to itself (pack_examples) and the loss is divided by the step's target tokens, so a packed step trains as the
    same examples unpacked."""

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
    """Forward pre-hook (with_kwargs) for native transformers models: a packed batch's mask of segment ids becomes
    position_ids that restart at each example and no mask, from which transformers builds a block-diagonal causal mask
    (masking_utils.find_packed_sequence_indices, when there is neither mask nor cache). A 0/1 mask passes."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2 or not bool((mask > 1).any()):
        return args, kwargs
    index = torch.arange(mask.shape[-1], device=mask.device)
    new = torch.ones_like(mask, dtype=torch.bool)
    new[:, 1:] = mask[:, 1:] != mask[:, :-1]
    kwargs = {**kwargs, "attention_mask": None, "use_cache": False,
              "position_ids": index - torch.where(new, index, 0).cummax(-1).values}
    return args, kwargs

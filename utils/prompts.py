"""The prompt templates of every model version, shared by training, predict, chat and the servers, built by the same
functions the models' chat() uses so that training and inference see the same text. The user message is a record's
instruct and query joined by a newline.

- ChatGLM-6B:  prompt + [gMASK] <sop> + answer + <eop>; labels from <sop> on (the loss also predicts <sop>).
- ChatGLM2-6B: [gMASK] sop + "[Round 1]\\n\\n问：...\\n\\n答：" + answer + </s>; labels on answer and </s>.
- ChatGLM3-6B: [gMASK] sop <|user|> \\n message <|assistant|> + \\n answer + </s>; labels after <|assistant|>.
- Other models (e.g. GLM-4, Llama): the tokenizer's chat template; labels on the assistant turn.
"""
import itertools
import json
from pathlib import Path

from utils.ner_data import QUERY_PREFIX
from utils.remote_code import remote_module


def chat_messages(turns, system=""):
    """[user, assistant] turns as chat messages after the system message, if any (the last turn may be a question)."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": role, "content": text}
                       for turn in turns for role, text in zip(("user", "assistant"), turn)]


def user_message(record) -> str:
    return "\n".join(part for part in (record["instruct"], record["query"]) if part)


def source_text(record) -> str:
    """The text an answer is extracted from: the query without `文本：` (the instruction's words are no entities)."""
    return record["query"].removeprefix(QUERY_PREFIX)


class ChatGLMPromptFormat:
    """Prompt and answer ids of ChatGLM-6B / 2-6B / 3-6B, built with the functions their chat() uses."""

    def __init__(self, tokenizer, version):
        self.tokenizer, self.version = tokenizer, version
        self.labels_from_prompt_end = int(version == "chatglm-6b")  # ChatGLM-6B: [gMASK] predicts the <sop> ending it
        if version == "chatglm-6b":
            self.build_v1_prompt = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration.build_prompt

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
        return tokenizer.build_chat_input(message, history=chat_messages(history, system))["input_ids"][0].tolist()

    def answer_parts(self, answer):
        """(content ids, closing ids) of the answer turn; truncation cuts only the content."""
        if self.version == "chatglm3-6b":
            # What the model writes after <|assistant|>: an empty metadata line, then the content.
            content = self.tokenizer.build_single_message("assistant", "", answer)[1:]
        else:
            content = self.tokenizer.encode(answer, add_special_tokens=False)
        return content, [self.tokenizer.eos_token_id]


class ChatTemplatePromptFormat:
    """Native transformers models (GLM-4, Llama...): their tokenizer's chat template. The answer turn ends with the
    special tokens the template writes after it, or (GLM-4: none) the next turn's role token, as GLM-4's own finetuning
    does; generation stops at those and the eos ids."""

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

    def prompt_ids(self, message, history, system="") -> list:
        return self._ids(chat_messages([*history, (message,)], system), generation_prompt=True)

    def _rendered_answer(self, answer):
        """Ids after the generation prompt once `answer` follows it (after a placeholder question, not an empty one)."""
        messages = chat_messages([("x",)])
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
    """(prompt ids of at most max_length tokens as fit_turns cuts them, truncated)."""
    ids, _, _, truncated = fit_turns(lambda text, turns: prompt_format.prompt_ids(text, turns, system),
                                     prompt_format.tokenizer, message, history, max_length)
    return ids, truncated

"""Tokenizer for ChatGLM3-6B (v3), written against transformers 5.x.

Stand-alone file: it is copied next to the official ``tokenizer.model`` and loaded through
``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``.
"""

import json
import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

# Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:VOCAB_FILES_NAMES
VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}

# Appended after the sentencepiece vocabulary, in id order.
SPECIAL_TOKENS = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
ROLES = ("system", "user", "assistant", "observation")


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM3-6B tokenizer (same sentencepiece model as ChatGLM2, plus four role tokens).

    Encoding: text goes to sentencepiece unchanged (dummy prefix added). A single sequence is
    ``[gMASK] sop`` + text; a pair is ``[gMASK] sop`` + A + B + ``</s>``. Nine specials follow the
    sentencepiece vocabulary: ``[MASK] [gMASK] [sMASK] sop eop`` (64789..64793) and the role tokens
    ``<|system|> <|user|> <|assistant|> <|observation|>`` (64794..64797). ``</s>`` (2) is eos,
    ``<unk>`` (0) is both unk and pad.

    By default the special names typed in text are encoded as ordinary text, so user input cannot
    inject role tokens. With ``encode_special_tokens=True`` the text is first split on the nine literal
    names, which map to their ids (needed to encode a rendered chat template).

    Decoding: the nine specials decode to their literal names (chat post-processing splits on
    ``<|assistant|>``); ids 0, 1, 2, negative ids and ids above 64797 decode to nothing. All pieces are
    joined by sentencepiece at once, as in the official tokenizer, so the dummy-prefix space of a piece
    that follows a special is kept. ``skip_special_tokens=True`` drops only eos/unk/pad, as officially.

    Generation should stop on ``[2, 64795, 64797]`` (``</s>``, ``<|user|>``, ``<|observation|>``).

    Padding is always on the left with id 0 (any other side raises ValueError). Whenever the padding
    step runs (every call in transformers 5.x, batched or not), ``attention_mask`` (1 = token, 0 = pad)
    and ``position_ids`` (0..n-1 for the tokens, 0 for pads) are emitted.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        encode_special_tokens=False,
        **kwargs,
    ):
        if kwargs.pop("padding_side", "left") != "left":
            raise ValueError("ChatGLM models expect left padding; padding_side must be 'left'.")
        # The base __init__ queries the vocabulary, so everything it needs must exist first.
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        n_pieces = self.sp_model.get_piece_size()
        self.glm_special_tokens = {name: n_pieces + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {i: name for name, i in self.glm_special_tokens.items()}
        # Token strings that decode to nothing: sentencepiece's unk/control pieces and out-of-range ids.
        self._silent_tokens = {"", "<unk>", "<s>", "</s>"}
        self._special_re = re.compile("(" + "|".join(re.escape(name) for name in SPECIAL_TOKENS) + ")")
        self.encode_special_tokens = encode_special_tokens
        self._base_vocab = {self.sp_model.id_to_piece(i): i for i in range(n_pieces)}
        self._base_vocab.update(self.glm_special_tokens)

        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # The official tokenizer never splits "</s>" or "<unk>" typed in text out as special ids: user text
        # cannot inject an end of sequence.
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            encode_special_tokens=encode_special_tokens,
            padding_side="left",
            **kwargs,
        )

    # ----------------------------------------------------------------------------- vocabulary

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer.vocab_size
    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size() + len(self.glm_special_tokens)

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer.get_vocab
    def get_vocab(self):
        return {**self._base_vocab, **self._added_tokens_encoder}

    def get_command(self, name):
        """Id of a GLM special or role token (``[gMASK]``, ``<|user|>``, ...) or of ``<unk>``/``<s>``/``</s>``."""
        if name in self.glm_special_tokens:
            return self.glm_special_tokens[name]
        if name in ("<unk>", "<s>", "</s>"):
            return self.sp_model.piece_to_id(name)
        raise ValueError(f"{name!r} is not a special token of this tokenizer.")

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer._convert_token_to_id
    def _convert_token_to_id(self, token):
        return self._base_vocab.get(token, self.sp_model.unk_id())

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer._convert_id_to_token
    def _convert_id_to_token(self, index):
        if index in self._special_names:
            return self._special_names[index]
        if 0 <= index < self.sp_model.get_piece_size():
            return self.sp_model.id_to_piece(index)
        return ""

    # ------------------------------------------------------------------------------- encoding

    def _tokenize(self, text, **kwargs):
        if not self.encode_special_tokens:
            return self.sp_model.encode(text, out_type=str)
        tokens = []
        # re.split with a capturing group alternates text chunks and special names.
        for i, chunk in enumerate(self._special_re.split(text)):
            if i % 2:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self.sp_model.encode(chunk, out_type=str))
        return tokens

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer._prefix_ids
    def _prefix_ids(self):
        return [self.glm_special_tokens["[gMASK]"], self.glm_special_tokens["sop"]]

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer.build_inputs_with_special_tokens
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self._prefix_ids() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer.get_special_tokens_mask
    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when the ids already contain special tokens.")
            special = set(self.all_special_ids) | set(self._special_names)
            return [1 if int(i) in special else 0 for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def build_single_message(self, role, metadata, message):
        """``[<|role|>] + sp(metadata + "\\n") + sp(message)``; never splits special names out of text."""
        if role not in ROLES:
            raise ValueError(f"Unknown role {role!r}; expected one of {ROLES}.")
        role_ids = [self.glm_special_tokens[f"<|{role}|>"]] + self.sp_model.encode(f"{metadata}\n")
        return role_ids + self.sp_model.encode(message)

    def build_message(self, item):
        """Ids of one ``{"role", "content", "metadata"?, "tools"?}`` message of a chat history: a system message's
        ``tools`` follow its content as JSON (indent 4, non-ASCII kept)."""
        content = item["content"]
        if item["role"] == "system" and "tools" in item:
            content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
        return self.build_single_message(item["role"], item.get("metadata", ""), content)

    def build_chat_input(self, query, history=None, role="user"):
        """Chat prompt ids as a ``"pt"`` BatchEncoding of batch size 1.

        ``history`` is a list of ``{"role", "content", "metadata"?, "tools"?}`` messages. The result is
        ``[gMASK] sop`` + every message + the query message (``role``, empty metadata) + ``<|assistant|>``.
        """
        input_ids = []
        for item in history or []:
            input_ids.extend(self.build_message(item))
        input_ids.extend(self.build_single_message(role, "", query))
        input_ids.append(self.glm_special_tokens["<|assistant|>"])
        return self.prepare_for_model(input_ids, return_tensors="pt", prepend_batch_axis=True)

    # ------------------------------------------------------------------------------- decoding

    def convert_tokens_to_string(self, tokens):
        # One sentencepiece join over all pieces, as the official tokenizer does: the nine specials are unknown
        # to sentencepiece and pass through verbatim (so "sop" + "▁你" gives "sop 你").
        return self.sp_model.decode_pieces([token for token in tokens if token not in self._silent_tokens])

    # -------------------------------------------------------------------------------- padding

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer._pad
    def _pad(
        self,
        encoded_inputs,
        max_length=None,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of=None,
        padding_side=None,
        return_attention_mask=None,
    ):
        side = padding_side if padding_side is not None else self.padding_side
        if side != "left":
            raise ValueError(f"ChatGLM models expect left padding; got padding_side={side!r}.")
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names

        input_ids = encoded_inputs["input_ids"]
        length = len(input_ids)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of

        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * length
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(length))

        if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None or max_length <= length:
            return encoded_inputs
        pad = max_length - length
        encoded_inputs["input_ids"] = [self.pad_token_id] * pad + list(input_ids)
        encoded_inputs["position_ids"] = [0] * pad + list(encoded_inputs["position_ids"])
        if "attention_mask" in encoded_inputs:
            encoded_inputs["attention_mask"] = [0] * pad + list(encoded_inputs["attention_mask"])
        if "token_type_ids" in encoded_inputs:
            encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * pad + list(encoded_inputs["token_type_ids"])
        if "special_tokens_mask" in encoded_inputs:
            encoded_inputs["special_tokens_mask"] = [1] * pad + list(encoded_inputs["special_tokens_mask"])
        return encoded_inputs

    # --------------------------------------------------------------------------------- saving

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer.save_vocabulary
    def save_vocabulary(self, save_directory, filename_prefix=None):
        out_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file):
            shutil.copyfile(self.vocab_file, out_file)
        return (out_file,)

"""Tokenizer for ChatGLM-6B (v1), written against transformers 5.x.

Stand-alone file: it is copied next to the official ``ice_text.model`` and loaded through
``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``.
"""

import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

VOCAB_FILES_NAMES = {"vocab_file": "ice_text.model"}

# Longest run of spaces that has its own piece (<|blank_2|> ... <|blank_80|>).
MAX_BLANK_LENGTH = 80
NEWLINE_TOKEN = "<n>"
TAB_TOKEN = "<|tab|>"
_BLANK_RE = re.compile(r"<\|blank_(\d+)\|>")


def _blank_token(n: int) -> str:
    return f"<|blank_{n}|>"


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM-6B tokenizer (sentencepiece unigram model with NFKC normalisation).

    Encoding: ``\\n`` -> ``<n>``, ``\\t`` -> ``<|tab|>``, runs of 2..80 spaces -> ``<|blank_n|>``
    (longest first), then sentencepiece with its dummy prefix. Ids are sentencepiece ids shifted by
    ``num_image_tokens``; ids below that offset are ``<image_k>``. A single sequence gets
    ``[gMASK] <sop>`` appended; a pair is ``A [gMASK] <sop> B <eop>``.

    Registered special tokens (split out of raw text): ``<sop>`` (bos), ``<eop>`` (eos), ``[MASK]``,
    ``<pad>``, ``<unk>``. ``[gMASK]`` and ``</s>`` (``end_token``) are plain attributes, so typing them
    in text does not produce their ids, as in the official tokenizer.

    Padding is always on the left with ``<pad>`` (any other side raises ValueError). Whenever a target
    length is in force (``padding=True``/``"longest"``/``"max_length"``, or a ``max_length``), ``_pad``
    also emits ``position_ids`` of shape ``[2, n]`` per sequence: row 0 counts 0..n-1 and is
    overwritten with the mask position from the ``<sop>`` index ``c`` onward (``[MASK]`` preferred over
    ``[gMASK]``, as the official tokenizer does); row 1 is 0 before ``c`` and 1, 2, ... from ``c``. Pads
    get 0 in both rows.

    Deliberate deviation from the official tokenizer: ``attention_mask`` is the ordinary 1/0 padding
    mask (1 = token, 0 = pad), not the official boolean ``[1, n, n]`` prefix-LM mask. Our model takes
    the 2-D padding mask and builds the prefix-LM mask itself, which keeps batches collatable and the
    tokenizer output uniform with the v2/v3 tokenizers.

    Decoding also deviates in one default: ``clean_up_tokenization_spaces`` follows transformers 5.x
    (False) instead of the True default of the transformers versions the official code ran on, because
    that clean-up deletes spaces before punctuation and corrupts code. Pass it explicitly to get the old
    behaviour.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file,
        do_lower_case=False,
        remove_space=False,
        bos_token="<sop>",
        eos_token="<eop>",
        end_token="</s>",
        mask_token="[MASK]",
        gmask_token="[gMASK]",
        pad_token="<pad>",
        unk_token="<unk>",
        num_image_tokens=20000,
        **kwargs,
    ):
        if kwargs.pop("padding_side", "left") != "left":
            raise ValueError("ChatGLM models expect left padding; padding_side must be 'left'.")
        # from_pretrained routes unknown ``*_token`` config keys here; keep gmask/end as plain
        # attributes so they are not registered (and split out of raw text) as special tokens.
        model_specific = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        gmask_token = str(model_specific.pop("gmask_token", gmask_token))
        end_token = str(model_specific.pop("end_token", end_token))
        if model_specific:
            kwargs["model_specific_special_tokens"] = model_specific

        # The base __init__ queries the vocabulary, so everything it needs must exist first.
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.gmask_token = gmask_token
        self.end_token = end_token
        self._base_vocab = self._build_base_vocab()

        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            bos_token=bos_token,
            eos_token=eos_token,
            mask_token=mask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            padding_side="left",
            **kwargs,
        )
        # Make save_pretrained write the plain-attribute tokens back to tokenizer_config.json.
        self.init_kwargs["gmask_token"] = gmask_token
        self.init_kwargs["end_token"] = end_token

    # ----------------------------------------------------------------------------- vocabulary

    def _build_base_vocab(self):
        vocab = {f"<image_{i}>": i for i in range(self.num_image_tokens)}
        for i in range(self.sp_model.get_piece_size()):
            vocab[self.sp_model.id_to_piece(i)] = i + self.num_image_tokens
        return vocab

    @property
    def vocab_size(self):
        return self.num_image_tokens + self.sp_model.get_piece_size()

    # Copied from remote_scripts/chatglm2-6b/tokenization_chatglm.py:ChatGLMTokenizer.get_vocab
    def get_vocab(self):
        return {**self._base_vocab, **self._added_tokens_encoder}

    @property
    def gmask_token_id(self):
        return self._convert_token_to_id(self.gmask_token)

    @property
    def end_token_id(self):
        return self._convert_token_to_id(self.end_token)

    def _convert_token_to_id(self, token):
        return self._base_vocab.get(token, self.num_image_tokens + self.sp_model.unk_id())

    def _convert_id_to_token(self, index):
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp_model.id_to_piece(index - self.num_image_tokens)

    # ------------------------------------------------------------------------------- encoding

    def _preprocess(self, text):
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", NEWLINE_TOKEN).replace("\t", TAB_TOKEN)
        # Longest runs first so that e.g. 85 spaces become <|blank_80|><|blank_5|>.
        for n in range(MAX_BLANK_LENGTH, 1, -1):
            text = text.replace(" " * n, _blank_token(n))
        return text

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(self._preprocess(text), out_type=str)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when the ids already contain special tokens.")
            special = set(self.all_special_ids) | {self.gmask_token_id}
            return [1 if int(i) in special else 0 for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    # ------------------------------------------------------------------------------- decoding

    def convert_tokens_to_string(self, tokens):
        # sentencepiece drops the dummy prefix and control pieces (<pad>, <sop>, [gMASK], ...);
        # unknown strings such as <image_k> pass through verbatim.
        text = self.sp_model.decode_pieces(list(tokens))
        text = text.replace(NEWLINE_TOKEN, "\n").replace(TAB_TOKEN, "\t")

        def blank(match):
            n = int(match.group(1))
            return " " * n if 2 <= n <= MAX_BLANK_LENGTH else match.group(0)

        return _BLANK_RE.sub(blank, text)

    # -------------------------------------------------------------------------------- padding

    def _position_ids(self, input_ids):
        """[2, n] GLM positions of one unpadded sequence (§2.1.2, tokenizer's mask preference)."""
        n = len(input_ids)
        context_length = input_ids.index(self.bos_token_id) if self.bos_token_id in input_ids else n
        main = list(range(n))
        for mask_id in (self.mask_token_id, self.gmask_token_id):
            if mask_id in input_ids:
                mask_position = input_ids.index(mask_id)
                main[context_length:] = [mask_position] * (n - context_length)
                break
        block = [0] * context_length + list(range(1, n - context_length + 1))
        return [main, block]

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
        # Positions are computed on the unpadded sequence, only when a target length is in force.
        if max_length is not None and "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = self._position_ids(list(input_ids))

        if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None or max_length <= length:
            return encoded_inputs
        pad = max_length - length
        encoded_inputs["input_ids"] = [self.pad_token_id] * pad + list(input_ids)
        if "attention_mask" in encoded_inputs:
            encoded_inputs["attention_mask"] = [0] * pad + list(encoded_inputs["attention_mask"])
        if "position_ids" in encoded_inputs:
            encoded_inputs["position_ids"] = [[0] * pad + list(row) for row in encoded_inputs["position_ids"]]
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

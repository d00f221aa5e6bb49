"""Tests for the ChatGLM v1/v2/v3 tokenizers in remote_scripts/ against the spec (§5, §6).

The real tokenizer files are read from /work/shared (``<repo>/../shared``); expected ids are either the
spec's worked examples (§5.3) or re-derived here with sentencepiece directly from the spec's rules.
"""

import filecmp
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets" / "tokenizers"

# version -> (folder name under assets/ and remote_scripts/, sentencepiece file)
VERSIONS = {
    "v1": ("chatglm-6b", "ice_text.model"),
    "v2": ("chatglm2-6b", "tokenizer.model"),
    "v3": ("chatglm3-6b", "tokenizer.model"),
}

V1_GMASK, V1_MASK, V1_SOP, V1_EOP, V1_PAD = 130001, 130000, 130004, 130005, 3
V2_PREFIX = [64790, 64792]


def make_model_dir(base: Path, version: str, name: str) -> Path:
    """A folder laid out like an official checkpoint: .model + tokenizer_config.json + our .py."""
    folder, model_file = VERSIONS[version]
    target = base / name
    target.mkdir()
    for file in (model_file, "tokenizer_config.json"):
        shutil.copyfile(ASSETS / folder / file, target / file)
    shutil.copyfile(REPO / "remote_scripts" / folder / "tokenization_chatglm.py", target / "tokenization_chatglm.py")
    return target


def load(path: Path, **kwargs):
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, **kwargs)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("chatglm_tokenizers")
    # Distinct folder names: transformers names the dynamic module after the folder.
    return {v: make_model_dir(base, v, f"glm_tok_{v}") for v in VERSIONS}


@pytest.fixture(scope="module")
def toks(model_dirs):
    return {v: load(d) for v, d in model_dirs.items()}


@pytest.fixture(scope="module")
def sps():
    return {
        v: spm.SentencePieceProcessor(model_file=str(ASSETS / folder / file)) for v, (folder, file) in VERSIONS.items()
    }


# --------------------------------------------------------------------------- §5.3 worked examples

TABLE = [
    ("你好", [5, 74874, 130001, 130004], [64790, 64792, 36474, 54591]),
    ("Hello world", [19316, 398, 130001, 130004], [64790, 64792, 13755, 993]),
    ("Hello\nworld", [19316, 4, 4664, 130001, 130004], [64790, 64792, 13755, 13, 8515]),
    ("a\tb", [104, 130008, 178, 130001, 130004], [64790, 64792, 260, 12, 30931]),
    (
        "def f():\n    return 1",
        [1616, 502, 125936, 4, 130011, 2091, 5, 9, 130001, 130004],
        [64790, 64792, 884, 279, 9427, 13, 296, 3793, 30910, 30939],
    ),
    (
        "ChatGLM-6B是清华大学开源的模型。",
        [14132, 5388, 340, 11, 21, 222, 63829, 72306, 85829, 63825, 67077, 63823, 130001, 130004],
        [64790, 64792, 22011, 10461, 30944, 30941, 30978, 30949, 54532, 35666, 42535, 54530, 34030, 31155],
    ),
    (" x", [399, 130001, 130004], [64790, 64792, 265, 30948]),
    ("\n\n", [5, 4, 4, 130001, 130004], [64790, 64792, 30910, 13, 13]),
]


@pytest.mark.parametrize("text,v1_ids,v23_ids", TABLE)
def test_spec_table(toks, text, v1_ids, v23_ids):
    assert toks["v1"](text)["input_ids"] == v1_ids
    assert toks["v2"](text)["input_ids"] == v23_ids
    assert toks["v3"](text)["input_ids"] == v23_ids


def v1_prompt(query, history):
    """§6.1: the bare query without history, else 0-based rounds with single newlines."""
    if not history:
        return query
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i}]\n问：{old_query}\n答：{response}\n"
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def test_v1_history_prompt(toks):
    prompt = v1_prompt("谢谢", [("你好", "你好👋！")])
    assert prompt == "[Round 0]\n问：你好\n答：你好👋！\n[Round 1]\n问：谢谢\n答："
    assert toks["v1"](prompt)["input_ids"] == [
        53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 4, 67342, 12, 74874, 130328, 130247, 130233, 130227, 35, 4,
        52, 6945, 5, 9, 42, 4, 64286, 12, 68934, 4, 67342, 12, 130001, 130004,
    ]  # fmt: skip
    assert toks["v1"](v1_prompt("你好", []))["input_ids"] == [5, 74874, 130001, 130004]


def test_v2_build_prompt(toks):
    tok = toks["v2"]
    assert tok.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert tok.build_prompt("你好", []) == "[Round 1]\n\n问：你好\n\n答："
    assert tok(tok.build_prompt("你好"))["input_ids"] == [
        64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211,
    ]  # fmt: skip
    with_history = "[Round 1]\n\n问：q1\n\n答：r1\n\n[Round 2]\n\n问：q2\n\n答："
    assert tok.build_prompt("q2", [("q1", "r1")]) == with_history


def test_v3_build_chat_input(toks):
    tok = toks["v3"]
    out = tok.build_chat_input("你好")
    assert isinstance(out["input_ids"], torch.Tensor)
    assert out["input_ids"].tolist() == [[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]]
    assert out["attention_mask"].tolist() == [[1] * 8]
    assert out["position_ids"].tolist() == [list(range(8))]

    history = [
        {"role": "system", "content": "You are ChatGLM3."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert tok.build_chat_input("你好", history=history)["input_ids"].tolist() == [[
        64790, 64792, 64794, 30910, 13, 809, 383, 22011, 10461, 30944, 30966, 30930, 64795, 30910, 13, 14980,
        64796, 30910, 13, 13755, 30992, 64795, 30910, 13, 36474, 54591, 64796,
    ]]  # fmt: skip


def test_v3_tools_metadata_and_roles(toks, sps):
    tok, sp = toks["v3"], sps["v3"]
    tools = [{"name": "查天气", "parameters": {"city": {"type": "string"}}}]
    history = [
        {"role": "system", "content": "Answer.", "tools": tools},
        {"role": "assistant", "metadata": "查天气", "content": "```python\ntool_call(city='北京')\n```"},
        {"role": "observation", "content": '{"temp": 20}'},
    ]
    tools_json = json.dumps(tools, indent=4, ensure_ascii=False)
    assert '"查天气"' in tools_json and '\n    {\n        "name"' in tools_json  # indent 4, non-ASCII kept
    expected = (
        V2_PREFIX
        + [64794] + sp.encode("\n") + sp.encode("Answer.\n" + tools_json)
        + [64796] + sp.encode("查天气\n") + sp.encode(history[1]["content"])
        + [64797] + sp.encode("\n") + sp.encode('{"temp": 20}')
        + [64797] + sp.encode("\n") + sp.encode("ok")
        + [64796]
    )  # fmt: skip
    assert tok.build_chat_input("ok", history=history, role="observation")["input_ids"][0].tolist() == expected
    # build_single_message never turns special names inside the message into their ids.
    message = tok.build_single_message("user", "", "<|assistant|>")
    assert message == [64795] + sp.encode("\n") + sp.encode("<|assistant|>")
    with pytest.raises(ValueError):
        tok.build_single_message("robot", "", "hi")


# ------------------------------------------------------- independent re-derivation from the rules

VARIED = [
    "",
    " ",
    "  ",
    "x",
    " leading",
    "trailing ",
    "  two leading",
    "trailing two  ",
    "line1\nline2\n\nline4",
    "\nstarts with a newline",
    "ends with a newline\n",
    "tab\tseparated\t\tvalues\t",
    " " * 85,
    " " * 81 + "z",
    "x" + " " * 160 + "y",
    " \t \n  mixed whitespace \n\t ",
    "混合中文 and English 文本，很好！",
    "emoji 😀👍🏽 and family 👨‍👩‍👧 🎉",
    "全角标点：，。！？；（）【】「」",
    "ＡＢＣ１２３ ①②③",
    "digits 1234567890 3.14159 -42 2023年10月1日",
    "def f(x):\n\treturn x ** 2  # comment\n",
    "Ünïcödé café naïve Привет мир こんにちは세계",
    "a\r\nb\u3000\u3000c",
] + ["a" + " " * n + "b" for n in range(1, 101)]


def v1_rule_text(text):
    """§5.1.4 steps 2-4 done differently from the tokenizer: every run of spaces is split into
    80-space blocks plus its remainder (the same result as replacing n = 80 .. 2 in turn)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    out, i = [], 0
    while i < len(text):
        if text[i] != " ":
            out.append(text[i])
            i += 1
            continue
        j = i
        while j < len(text) and text[j] == " ":
            j += 1
        full, rest = divmod(j - i, 80)
        out.append("<|blank_80|>" * full + (f"<|blank_{rest}|>" if rest >= 2 else " " * rest))
        i = j
    return "".join(out)


def test_v1_rule_text_helper():
    assert v1_rule_text("a" + " " * 85 + "b") == "a<|blank_80|><|blank_5|>b"
    assert v1_rule_text(" " * 81 + "\t\n") == "<|blank_80|> <|tab|><n>"


@pytest.mark.parametrize("text", VARIED)
def test_rederived_ids(toks, sps, text):
    assert toks["v1"](text)["input_ids"] == sps["v1"].encode(v1_rule_text(text)) + [V1_GMASK, V1_SOP]
    assert toks["v2"](text)["input_ids"] == V2_PREFIX + sps["v2"].encode(text)
    assert toks["v3"](text)["input_ids"] == V2_PREFIX + sps["v3"].encode(text)


@pytest.mark.parametrize("text", VARIED)
def test_v2_v3_roundtrip(toks, text):
    ids = toks["v2"](text)["input_ids"]
    assert toks["v2"].decode(ids) == text
    ids = toks["v3"](text)["input_ids"]
    # One sentencepiece join over all pieces (official): the first piece's dummy-prefix space follows "sop".
    assert toks["v3"].decode(ids) == "[gMASK]sop" + (" " + text if text else "")
    # Only eos/unk/pad are registered specials, so skip_special_tokens keeps [gMASK] and sop (official).
    assert toks["v3"].decode(ids, skip_special_tokens=True) == toks["v3"].decode(ids)
    assert toks["v3"].decode(ids[2:]) == text


# v1 normalises with sentencepiece's nmt_nfkc and strips leading and trailing whitespace, so its round
# trip is checked against Python's NFKC on texts without edge whitespace and without characters that
# nmt_nfkc (unlike NFKC) turns into spaces: CR, ideographic space, zero-width joiner.
V1_ROUNDTRIP = [t for t in VARIED if t and t == t.strip() and not set(t) & {"\r", "\u3000", "\u200d"}]


@pytest.mark.parametrize("text", V1_ROUNDTRIP)
def test_v1_roundtrip_nfkc(toks, text):
    tok = toks["v1"]
    assert tok.decode(tok(text)["input_ids"]) == unicodedata.normalize("NFKC", text)


def test_v1_nfkc_folding_is_real(toks):
    tok = toks["v1"]
    ids = tok("你好！：，")["input_ids"]
    assert ids[-5:-2] == [35, 12, 6]  # full-width ! : , become ASCII
    assert tok.decode(ids) == "你好!:,"


# ----------------------------------------------------------------------------------- padding

def test_v1_batch_left_padding(toks):
    tok = toks["v1"]
    batch = tok(["你好", "Hello world"], padding=True)
    assert batch["input_ids"] == [[5, 74874, V1_GMASK, V1_SOP], [19316, 398, V1_GMASK, V1_SOP]]
    assert batch["position_ids"] == [[[0, 1, 2, 2], [0, 0, 0, 1]], [[0, 1, 2, 2], [0, 0, 0, 1]]]

    batch = tok(["你好", "Hello\nworld x"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [
        [V1_PAD, V1_PAD, 5, 74874, V1_GMASK, V1_SOP],
        [19316, 4, 4664, 399, V1_GMASK, V1_SOP],  # 399 = "▁x" (§5.3)
    ]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["position_ids"].shape == (2, 2, 6)
    assert batch["position_ids"].tolist() == [
        [[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 1]],
        [[0, 1, 2, 3, 4, 4], [0, 0, 0, 0, 0, 1]],
    ]


def test_v1_padding_details(toks):
    tok = toks["v1"]
    # An unpadded single call gives no positions; a target length does.
    assert "position_ids" not in tok("你好")
    single = tok("你好", padding="max_length", max_length=7)
    assert single["input_ids"] == [3, 3, 3, 5, 74874, V1_GMASK, V1_SOP]
    assert single["attention_mask"] == [0, 0, 0, 1, 1, 1, 1]
    assert single["position_ids"] == [[0, 0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1]]
    # The tokenizer prefers [MASK] (registered, so split out of raw text) over [gMASK].
    ids = tok("a[MASK]b", padding=True)
    mask_pos = ids["input_ids"].index(V1_MASK)
    sop = ids["input_ids"].index(V1_SOP)
    assert ids["position_ids"][0] == list(range(sop)) + [mask_pos] * (len(ids["input_ids"]) - sop)
    # A pair: A [gMASK] <sop> B <eop>; the block row counts from <sop>.
    pair = tok("你好", "谢谢", padding=True)
    assert pair["input_ids"][:4] == [5, 74874, V1_GMASK, V1_SOP] and pair["input_ids"][-1] == V1_EOP
    n = len(pair["input_ids"])
    assert pair["position_ids"] == [[0, 1, 2] + [2] * (n - 3), [0, 0, 0] + list(range(1, n - 2))]
    # tokenizer.pad as a collator on unpadded features gives the same as batched padding.
    collated = tok.pad([tok("你好"), tok("Hello\nworld x")], return_tensors="pt")
    batched = tok(["你好", "Hello\nworld x"], padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(collated[key], batched[key])
    # Padding ids are dropped on decode.
    assert tok.batch_decode(batched["input_ids"]) == ["你好", "Hello\nworld x"]


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_v2_v3_batch_left_padding(toks, version):
    tok = toks[version]
    batch = tok(["你好", "Hello\nworld"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [
        [0, 64790, 64792, 36474, 54591],
        [64790, 64792, 13755, 13, 8515],
    ]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    # Positions are emitted whenever the padding step runs, even for one unpadded sequence.
    assert tok("你好")["position_ids"] == [0, 1, 2, 3]
    padded = tok("你好", padding="max_length", max_length=6, return_special_tokens_mask=True)
    assert padded["input_ids"] == [0, 0, 64790, 64792, 36474, 54591]
    assert padded["position_ids"] == [0, 0, 0, 1, 2, 3]
    assert padded["special_tokens_mask"] == [1, 1, 1, 1, 0, 0]
    multiple = tok(["你好"], padding=True, pad_to_multiple_of=8)
    assert multiple["input_ids"] == [[0] * 4 + [64790, 64792, 36474, 54591]]
    decoded = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    # v2 decodes [gMASK] sop to nothing; v3 keeps their names and joins all pieces at once (both official).
    assert decoded == (["你好", "Hello\nworld"] if version == "v2" else ["[gMASK]sop 你好", "[gMASK]sop Hello\nworld"])


@pytest.mark.parametrize("version", list(VERSIONS))
def test_only_left_padding(toks, model_dirs, version):
    tok = toks[version]
    assert tok.padding_side == "left"
    with pytest.raises(ValueError, match="left"):
        tok(["a", "bb cc"], padding=True, padding_side="right")
    with pytest.raises(ValueError, match="left"):
        load(model_dirs[version], padding_side="right")


# ------------------------------------------------------------------------- special tokens & decoding

def test_v1_special_tokens(toks, sps):
    tok, sp = toks["v1"], sps["v1"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.pad_token_id, tok.unk_token_id) == (
        V1_SOP, V1_EOP, V1_MASK, V1_PAD, 0,
    )
    assert (tok.gmask_token, tok.gmask_token_id, tok.end_token, tok.end_token_id) == ("[gMASK]", V1_GMASK, "</s>", 2)
    assert len(tok) == tok.vocab_size == 130344
    # Registered specials are split out of raw text; [gMASK] and </s> are not.
    assert tok("a<sop>b")["input_ids"] == sp.encode("a") + [V1_SOP] + sp.encode("b") + [V1_GMASK, V1_SOP]
    assert tok("[gMASK]</s>")["input_ids"] == sp.encode("[gMASK]</s>") + [V1_GMASK, V1_SOP]
    assert V1_GMASK not in sp.encode("[gMASK]</s>")
    ids = tok("Hello\n\tworld" + " " * 3)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["▁Hello", "<n>", "<|tab|>", "world", "<|blank_3|>", "[gMASK]", "<sop>"]
    assert tok.decode(ids) == "Hello\n\tworld   "
    assert tok.decode([V1_PAD, 19316, V1_EOP]) == "Hello"
    assert tok.decode([19316, V1_EOP, V1_MASK], skip_special_tokens=True) == "Hello"
    assert tok.get_special_tokens_mask([5, 6], [7]) == [0, 0, 1, 1, 0, 1]


def test_v1_config_options(model_dirs, toks):
    tok = load(model_dirs["v1"], do_lower_case=True, remove_space=True)
    assert tok("  Hello   World \n")["input_ids"] == toks["v1"]("hello world")["input_ids"]
    ids = toks["v1"]("你好")["input_ids"] + [V1_EOP, V1_PAD]
    assert toks["v1"].get_special_tokens_mask(ids, already_has_special_tokens=True) == [0, 0, 1, 1, 1, 1]


def test_v1_image_token_offset(model_dirs):
    tok = load(model_dirs["v1"], num_image_tokens=20000)
    assert tok.vocab_size == len(tok) == 150344
    ids = tok("你好")["input_ids"]
    assert ids == [20005, 94874, 150001, 150004]
    assert (tok.pad_token_id, tok.gmask_token_id, tok.bos_token_id) == (20003, 150001, 150004)
    assert tok.convert_ids_to_tokens([7, 20005]) == ["<image_7>", "▁"]
    assert tok.convert_tokens_to_ids("<image_7>") == 7
    assert tok.decode([20003] + ids) == "你好"


def test_v2_specials_and_decode(toks):
    tok = toks["v2"]
    assert len(tok) == tok.vocab_size == 64794
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.pad_token) == (2, 0, 0, "<unk>")
    assert [tok.get_command(n) for n in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "</s>")] == [
        64789, 64790, 64791, 64792, 64793, 2,
    ]
    with pytest.raises(ValueError):
        tok.get_command("<|user|>")
    assert tok.convert_ids_to_tokens([64790, 64792, 13]) == ["[gMASK]", "sop", "<0x0A>"]
    assert tok.decode([64790, 64792, 64789, 64791, 64793, 0, 1, 2, 13755, 2]) == "Hello"
    assert tok.decode([13755, 64793, 993]) == "Hello world"
    # Specials typed in text are ordinary text; a pair ends with </s>.
    assert 64790 not in tok("[gMASK]sop")["input_ids"][2:]
    assert tok("你好", "Hello")["input_ids"] == V2_PREFIX + [36474, 54591, 13755, 2]
    assert tok.get_special_tokens_mask([0, 64790, 64792, 13755, 2], already_has_special_tokens=True) == [1, 1, 1, 0, 1]


def test_v3_specials_and_decode(toks, model_dirs, sps):
    tok, sp = toks["v3"], sps["v3"]
    assert len(tok) == tok.vocab_size == 64798
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [tok.get_command(r) for r in roles] == [64794, 64795, 64796, 64797]
    assert tok.convert_tokens_to_ids(roles + ["[gMASK]"]) == [64794, 64795, 64796, 64797, 64790]
    assert tok.decode([64796, 30910, 13, 13755]) == "<|assistant|> \n Hello"
    assert tok.decode([13755, 64795]) == "Hello<|user|>"
    assert tok.decode([13755, 0, 1, 2, -1, 64798, 65000, 993]) == "Hello world"
    assert tok.decode([64796, 13755, 64795, 2], skip_special_tokens=True) == "<|assistant|> Hello<|user|>"

    # Role names typed in text stay text by default (no prompt injection) ...
    ids = tok("<|user|>hi")["input_ids"]
    assert 64795 not in ids and ids == V2_PREFIX + sp.encode("<|user|>hi")
    # ... and become their ids with encode_special_tokens=True.
    enc = load(model_dirs["v3"], encode_special_tokens=True)
    assert enc("<|user|>hi")["input_ids"] == V2_PREFIX + [64795] + sp.encode("hi")
    history = [{"role": "system", "content": "You are ChatGLM3."}, {"role": "user", "content": "hi"}]
    chat_ids = tok.build_chat_input("你好", history=history)["input_ids"][0].tolist()
    assert tok.decode(chat_ids) == "[gMASK]sop<|system|> \n You are ChatGLM3.<|user|> \n hi<|user|> \n 你好<|assistant|>"
    # The chat-template rendering ("\n " after each role) encodes to the build_chat_input ids (spec 6.3).
    template = "[gMASK]sop<|system|>\n You are ChatGLM3.<|user|>\n hi<|user|>\n 你好<|assistant|>"
    assert enc(template, add_special_tokens=False)["input_ids"] == chat_ids


# ------------------------------------------------------------------- AutoTokenizer & save/reload

@pytest.mark.parametrize("version", list(VERSIONS))
def test_save_pretrained_roundtrip(toks, tmp_path, version):
    tok = toks[version]
    assert type(tok).__name__ == "ChatGLMTokenizer"
    folder, model_file = VERSIONS[version]
    saved = tmp_path / f"glm_saved_{version}"
    tok.save_pretrained(str(saved))
    assert filecmp.cmp(saved / model_file, ASSETS / folder / model_file, shallow=False)
    assert (saved / "tokenization_chatglm.py").is_file()

    reloaded = load(saved)
    assert reloaded.padding_side == "left" and len(reloaded) == len(tok)
    assert reloaded.all_special_tokens == tok.all_special_tokens
    texts = VARIED[:30] + [t for t, _, _ in TABLE]
    assert reloaded(texts)["input_ids"] == tok(texts)["input_ids"]
    batch = tok(texts, padding=True)
    assert reloaded(texts, padding=True) == batch
    assert reloaded.batch_decode(batch["input_ids"]) == tok.batch_decode(batch["input_ids"])
    if version == "v1":
        assert reloaded.gmask_token_id == V1_GMASK
        assert V1_GMASK not in reloaded("[gMASK]")["input_ids"][:-2]


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_v2_v3_typed_eos_and_unk_stay_text(toks, sps, version):
    text = "say </s> or <unk> here"
    assert toks[version](text)["input_ids"] == V2_PREFIX + sps[version].encode(text)

"""Multi-turn conversations: ChatGLM3 conversation records with tool calls encode to the ids of the real tokenizer's
build_single_message / build_chat_input with labels on exactly the learnt assistant turns; loss_on_all_turns gives
ChatGLM-6B / ChatGLM2-6B one sample per answer, each its chat() prompt + answer; process.py converts ShareGPT and
OpenAI tool-call data; bad conversations stop naming file, line and field (or are skipped and counted)."""
import ast
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TOKENIZERS
from utils.data_io import BadLines, DataError
from utils.dataset import InstructionDataset, encode_example, encode_record, format_example
from utils.model_loading import remote_module
from utils.prompts import get_prompt_format
from utils.records import read_instruction_records

GMASK, SOP, EOS = 64790, 64792, 2
SYSTEM, USER, ASSISTANT, OBSERVATION = 64794, 64795, 64796, 64797

WEATHER_TOOL = {"name": "get_weather", "description": "查询城市天气",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
BEIJING_CALL = "```python\ntool_call(city='北京')\n```"
SHANGHAI_CALL = "```python\ntool_call(city='上海', days=2)\n```"
# system with tools, user, a tool call, its observation, the answer; a second round whose first part is not learnt
TOOL_CONVERSATION = [
    {"role": "system", "content": "你是天气助手。", "tools": [WEATHER_TOOL]},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": BEIJING_CALL},
    {"role": "observation", "content": '{"temperature": 22}'},
    {"role": "assistant", "content": "北京现在 22 度。"},
    {"role": "user", "content": "上海呢？这两天"},
    {"role": "assistant", "content": "我查一下。", "loss": False},
    {"role": "assistant", "metadata": "get_weather", "content": SHANGHAI_CALL},
    {"role": "observation", "content": '{"temperature": 25}'},
    {"role": "assistant", "content": "上海这两天 25 度。"},
]


@pytest.fixture(scope="module")
def tokenizers():
    return {version: remote_module(version, "tokenization_chatglm").ChatGLMTokenizer.from_pretrained(str(TOKENIZERS / version))
            for version in ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")}


def write_lines(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def target_runs(example):
    """The runs of consecutive target ids (labels equal to the ids there), in order."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + [current] if current else runs


# ---------------------------------------------------------------------------------------------------- ChatGLM3


def test_chatglm3_tool_call_conversation_is_what_the_tokenizer_builds(tokenizers, tmp_path):
    tok = tokenizers["chatglm3-6b"]
    path = write_lines(tmp_path / "train.txt", [{"conversations": TOOL_CONVERSATION}])
    data = InstructionDataset(path, tok, "chatglm3-6b", max_source_length=512, max_target_length=128)
    assert len(data) == 1 and data.stats["truncated_prompts"] == data.stats["truncated_answers"] == 0
    example = data[0]

    # The ids: [gMASK] sop, each message by build_single_message (the tools as JSON after the system text), </s>.
    tools_json = json.dumps([WEATHER_TOOL], indent=4, ensure_ascii=False)
    blocks = [tok.build_single_message("system", "", "你是天气助手。\n" + tools_json)]
    blocks += [tok.build_single_message(m["role"], m.get("metadata", ""), m["content"]) for m in TOOL_CONVERSATION[1:]]
    assert example["input_ids"] == [GMASK, SOP] + [i for block in blocks for i in block] + [EOS]
    # Before every assistant message stands exactly the prompt that chat() builds for that turn.
    start = 2
    for k, (message, block) in enumerate(zip(TOOL_CONVERSATION, blocks)):
        if message["role"] == "assistant":
            before = TOOL_CONVERSATION[k - 1]
            prompt = tok.build_chat_input(before["content"], history=TOOL_CONVERSATION[:k - 1], role=before["role"])
            assert example["input_ids"][:start + 1] == prompt["input_ids"][0].tolist()
        start += len(block)

    # Targets: each learnt assistant message after its role token, and the token that ends it (the next role token,
    # or </s>); nothing of the system, user and observation messages, nor of the "loss": false message.
    sp = tok.sp_model.encode
    assert target_runs(example) == [
        sp("get_weather\n") + sp(BEIJING_CALL) + [OBSERVATION],
        sp("\n") + sp("北京现在 22 度。") + [USER],
        sp("get_weather\n") + sp(SHANGHAI_CALL) + [OBSERVATION],
        sp("\n") + sp("上海这两天 25 度。") + [EOS],
    ]
    # The tool call's own role token follows the unlearnt message, so it is no target either.
    unlearnt = tok.build_single_message("assistant", "", "我查一下。")
    at = next(i for i in range(len(example["input_ids"])) if example["input_ids"][i:i + len(unlearnt)] == unlearnt)
    assert example["labels"][at:at + len(unlearnt) + 1] == [-100] * (len(unlearnt) + 1)
    assert example["input_ids"][at + len(unlearnt)] == ASSISTANT


def test_tool_call_text_reads_back_as_chatglm3_reads_it():
    """ChatGLM3's chat() drops the code-fence lines of a tool call and reads `tool_call(k=v, ...)` (spec §6.3)."""
    from utils.chat_data import tool_call_content

    arguments = {"city": "北京", "days": 2, "metric": True, "hours": [6, 12.5], "extra": {"unit": "°C", "note": None}}
    content = tool_call_content(arguments, "f", 1, "arguments")
    call = ast.parse("\n".join(content.split("\n")[1:-1]), mode="eval").body
    assert content.startswith("```python\ntool_call(") and content.endswith(")\n```")
    assert call.func.id == "tool_call" and not call.args
    assert {k.arg: ast.literal_eval(k.value) for k in call.keywords} == arguments


def test_one_chatglm3_turn_is_the_single_turn_encoding(tokenizers, tmp_path):
    """A one-turn conversation record and the instruction record of the same turn give the same ids and labels; so do
    an instruction record with history (answers on: the history answers become targets too, nothing else changes)."""
    tok = tokenizers["chatglm3-6b"]
    prompt_format = get_prompt_format(tok, "chatglm3-6b")
    single = {"instruct": "", "query": "你好", "answer": "你好！", "line": 1}
    conversation = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}], "line": 1}
    assert encode_record(conversation, prompt_format, 64, 32)[0] == [encode_example(single, prompt_format, 64, 32)[0]]

    record = {"instruct": "说说", "query": "谢谢", "answer": "不客气", "history": [["你好", "你好！"], ["1+1=?", "2"]], "line": 2}
    [last_only], *_ = encode_record(record, prompt_format, 256, 64)
    [every_turn], *_ = encode_record(record, prompt_format, 256, 64, loss_on_all_turns=True)
    assert every_turn["input_ids"] == last_only["input_ids"]
    sp = tok.sp_model.encode
    assert target_runs(last_only) == [sp("\n") + sp("不客气") + [EOS]]
    assert target_runs(every_turn) == [sp("\n") + sp("你好！") + [USER], sp("\n") + sp("2") + [USER], sp("\n") + sp("不客气") + [EOS]]


def test_chatglm3_truncation_drops_the_oldest_rounds_and_counts(tokenizers, tmp_path):
    tok = tokenizers["chatglm3-6b"]
    prompt_format = get_prompt_format(tok, "chatglm3-6b")
    record = {"conversations": TOOL_CONVERSATION, "line": 1}
    [whole], *_ = encode_record(record, prompt_format, 512, 128)
    system = 2 + len(tok.build_single_message("system", "", "你是天气助手。\n" + json.dumps([WEATHER_TOOL], indent=4, ensure_ascii=False)))
    second_round = whole["input_ids"].index(USER, system + 1)  # the second user message
    answer = len(tok.build_single_message("assistant", "", "上海这两天 25 度。"))  # its content and </s>
    # Room for the system message and the second round's prompt only: the first round (two learnt answers) goes.
    budget = len(whole["input_ids"]) - answer - second_round + system
    [cut], prompt_cuts, answer_cuts, dropped = encode_record(record, prompt_format, budget, 128)
    assert (prompt_cuts, answer_cuts, dropped) == (1, 0, 2)
    assert cut["input_ids"] == whole["input_ids"][:system] + whole["input_ids"][second_round:]
    # The second round's <|user|> now follows the system message, not a learnt answer: no target any more.
    assert whole["labels"][second_round] == USER
    assert cut["labels"] == whole["labels"][:system] + [-100] + whole["labels"][second_round + 1:]
    # One token less: the last round's user message loses its tail; a cut answer is counted too.
    [cut], prompt_cuts, answer_cuts, dropped = encode_record(record, prompt_format, budget - 1, 3)
    assert (prompt_cuts, answer_cuts, dropped) == (1, 1, 2)
    user = cut["input_ids"].index(USER)
    assert cut["input_ids"][user:cut["input_ids"].index(ASSISTANT, user)] == tok.build_single_message("user", "", "上海呢？这两")
    assert target_runs(cut)[-1] == (tok.sp_model.encode("\n") + tok.sp_model.encode("上海这两天 25 度。"))[:3] + [EOS]

    # Not even the system message and the last round's calls and observations fit: the record is refused, by line.
    with pytest.raises(DataError, match="t.txt:7: field 'conversations': longer than max_source_length=100 even with"):
        encode_record({**record, "line": 7}, prompt_format, 100, 128, path=tmp_path / "t.txt")

    path = write_lines(tmp_path / "t.txt", [{"conversations": TOOL_CONVERSATION}, {"instruct": "", "query": "你好", "answer": "好"}])
    data = InstructionDataset(path, tok, "chatglm3-6b", max_source_length=budget, max_target_length=128)
    assert data.describe() == (f"{path}: 2 samples, {data.stats['tokens']} tokens; truncated prompts 1 (max_source_length), "
                               "truncated answers 0 (max_target_length); learnt answers left out with the oldest turns 2 "
                               "(max_source_length)")


# ChatGLM3's finetune_demo format as its README gives it: top-level tools (their format left open: a ToolAlpaca-style
# string among them), a system message, an assistant thought before a tool message (name, parameters, observation), a
# tool message with "loss": false, an observation that is JSON data and one that is text.
FINETUNE_RECORD = {
    "tools": [WEATHER_TOOL, "search: 搜索网页"],
    "conversations": [
        {"role": "system", "content": "你是天气助手。"},
        {"role": "user", "content": "北京明天冷吗？"},
        {"role": "assistant", "content": "我查一下北京明天的天气。"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京", "days": 1, "hourly": True,
                                                             "hours": [6, 12.5], "unit": None},
         "observation": {"temperature": -3, "天气": "晴"}},
        {"role": "assistant", "content": "北京明天零下 3 度，晴，很冷。"},
        {"role": "user", "content": "那搜一下羽绒服"},
        {"role": "tool", "name": "search", "parameters": {"query": "羽绒服"}, "observation": "找到 3 家店", "loss": False},
        {"role": "assistant", "content": "找到了 3 家店。"},
    ],
}


def official_finetune_encoding(tok, item):
    """input_ids and labels of a finetune_demo record by the rules of ChatGLM3's own preprocessing
    (finetune_chatmodel_demo/preprocess_utils.py, THUDM/ChatGLM3 before 2024-01-27; its finetune_hf.py since then
    raises NotImplementedError on tools), restated here independently of utils/:
    - [gMASK] sop; the tools first, as a system message of their own: the tool prompt, a line break and
      json.dumps(tools, indent=4, ensure_ascii=False);
    - each message build_single_message(role, "", content); a tool message becomes an assistant message with the
      tool's name as metadata and "```python\n" + the unparsed call tool_call(name=constant, ...) + "\n```", then
      an observation message with the observation (JSON text unless it is a string);
    - loss: a message's "loss", default true, but never for system and user messages nor for the observation;
    - </s> closes it, and a token is a target when the token before it lies in a learnt message."""
    messages = list(item["conversations"])
    if "tools" in item:
        messages.insert(0, {"role": "system", "content": "Answer the following questions as best as you can. You have "
                            "access to the following tools:\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)})
    tokens, learnt = [GMASK, SOP], [False, False]
    for message in messages:
        loss = message.get("loss", True) and message["role"] not in ("system", "user")
        if message["role"] == "tool":
            call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                            keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in message["parameters"].items()])
            parts = [("assistant", message["name"], "```python\n" + ast.unparse(call) + "\n```", loss)]
            observation = message["observation"]
            parts.append(("observation", "", observation if isinstance(observation, str)
                          else json.dumps(observation, ensure_ascii=False), False))
        else:
            parts = [(message["role"], "", message["content"], loss)]
        for role, metadata, text, part_loss in parts:
            ids = tok.build_single_message(role, metadata, text)
            tokens += ids
            learnt += [part_loss] * len(ids)
    tokens.append(EOS)
    learnt.append(False)
    return {"input_ids": tokens, "labels": [t if m else -100 for t, m in zip(tokens, [False] + learnt[:-1])]}


def test_chatglm3_finetune_demo_format_encodes_as_the_official_code(tokenizers, tmp_path):
    """A finetune_demo record (role tool, top-level tools, loss) is read as it is, by the training scripts and by
    process.py, and encodes to exactly the official preprocessing's ids and labels."""
    tok = tokenizers["chatglm3-6b"]
    official = official_finetune_encoding(tok, FINETUNE_RECORD)
    assert sum(label != -100 for label in official["labels"]) > 0
    # The training scripts read the record unchanged.
    train = write_lines(tmp_path / "train.txt", [FINETUNE_RECORD])
    data = InstructionDataset(train, tok, "chatglm3-6b", max_source_length=1024, max_target_length=256)
    assert len(data) == 1 and data[0] == official
    # process.py reads it too (also as the JSON array that the finetune_demo README shows) and writes a ChatGLM3
    # conversation record that encodes the same way.
    array = tmp_path / "finetune.json"
    array.write_text(json.dumps([FINETUNE_RECORD], ensure_ascii=False, indent=2), encoding="utf-8")
    result = run_process("--train_file", array, "--dev_file", "", "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    [written] = [json.loads(line) for line in (tmp_path / "out" / "train.txt").read_text(encoding="utf-8").splitlines()]
    assert [m["role"] for m in written["conversations"]] == [
        "system", "system", "user", "assistant", "assistant", "observation", "assistant", "user", "assistant",
        "observation", "assistant"]
    assert written["conversations"][0]["tools"] == FINETUNE_RECORD["tools"]
    assert written["conversations"][4] == {"role": "assistant", "metadata": "get_weather", "content": (
        "```python\ntool_call(city='北京', days=1, hourly=True, hours=[6, 12.5], unit=None)\n```")}
    assert written["conversations"][5] == {"role": "observation", "content": '{"temperature": -3, "天气": "晴"}'}
    assert written["conversations"][8]["loss"] is False
    again = InstructionDataset(tmp_path / "out" / "train.txt", tok, "chatglm3-6b", max_source_length=1024,
                               max_target_length=256)
    assert again[0] == official

    # The format's other shapes: no tools (no tool prompt), tools without a system message of the data's own, plain
    # turns with a system message, plain turns over two rounds (every answer learnt), one plain turn; read directly
    # and through process.py alike (plain ones stay conversation records: an instruction record would put the system
    # text into the question and learn only the last answer; the one plain turn encodes the same either way).
    plain = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    shapes = [{"conversations": FINETUNE_RECORD["conversations"][:3]},
              {"tools": [WEATHER_TOOL], "conversations": FINETUNE_RECORD["conversations"][1:5]},
              {"conversations": [FINETUNE_RECORD["conversations"][0], *plain]},
              {"conversations": [*plain, {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]},
              {"conversations": plain}]
    write_lines(train, shapes)
    result = run_process("--train_file", train, "--dev_file", "", "--output_dir", tmp_path / "shapes")
    assert result.returncode == 0, result.stderr
    expected = [official_finetune_encoding(tok, record) for record in shapes]
    for path in (train, tmp_path / "shapes" / "train.txt"):
        assert list(InstructionDataset(path, tok, "chatglm3-6b", max_source_length=1024)) == expected


# ---------------------------------------------------------------------------------------------------- v1 / v2


def v2_prompt(query, history):
    """ChatGLM2-6B's chat prompt (spec §6.2): 1-based rounds, double newlines."""
    turns = [*history, (query, None)]
    return "".join(f"[Round {i}]\n\n问：{q}\n\n答：" + (f"{a}\n\n" if a is not None else "") for i, (q, a) in enumerate(turns, 1))


def v1_prompt(query, history):
    """ChatGLM-6B's chat prompt (spec §6.1): the bare query without history, else 0-based rounds."""
    if not history:
        return query
    return "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history)) + f"[Round {len(history)}]\n问：{query}\n答："


TURNS = [("你好", "你好！有什么可以帮你的？"), ("1+1=?", "2"), ("谢谢", "不客气")]


def test_v2_every_answer_learnt_with_its_own_chat_prompt(tokenizers):
    tok = tokenizers["chatglm2-6b"]
    prompt_format = get_prompt_format(tok, "chatglm2-6b")
    record = {"instruct": "", "query": TURNS[-1][0], "answer": TURNS[-1][1], "history": [list(t) for t in TURNS[:-1]], "line": 1}
    samples, *_ = encode_record(record, prompt_format, 256, 64, loss_on_all_turns=True)
    assert len(samples) == 3
    for k, sample in enumerate(samples):
        prompt = tok.encode(v2_prompt(TURNS[k][0], TURNS[:k]))
        answer = tok.encode(TURNS[k][1], add_special_tokens=False) + [EOS]
        assert sample["input_ids"] == prompt + answer
        assert sample["labels"] == [-100] * len(prompt) + answer
    # Off (the default): the last answer only, as before.
    assert encode_record(record, prompt_format, 256, 64)[0] == samples[-1:]
    # Why not one sequence: inside the next prompt the first answer is encoded differently (and has no </s>).
    second_prompt = tok.encode(v2_prompt(TURNS[1][0], TURNS[:1]))
    assert second_prompt[:len(samples[0]["input_ids"]) - 1] != samples[0]["input_ids"][:-1]


def test_v1_every_answer_learnt_with_its_own_chat_prompt(tokenizers):
    tok = tokenizers["chatglm-6b"]
    prompt_format = get_prompt_format(tok, "chatglm-6b")
    conversation = {"conversations": [{"role": "user" if i % 2 == 0 else "assistant", "content": TURNS[i // 2][i % 2]}
                                      for i in range(6)], "line": 1}
    conversation["conversations"][3]["loss"] = False  # the second answer is context only
    samples, *_ = encode_record(conversation, prompt_format, 256, 64)
    assert len(samples) == 2
    for sample, k in zip(samples, (0, 2)):
        prompt = tok.encode(v1_prompt(TURNS[k][0], TURNS[:k]), add_special_tokens=False) + [130001, 130004]  # [gMASK] <sop>
        answer = tok.encode(TURNS[k][1], add_special_tokens=False) + [130005]  # <eop>
        assert sample["input_ids"] == prompt + answer
        assert sample["labels"] == [-100] * (len(prompt) - 1) + prompt[-1:] + answer  # [gMASK] predicts <sop>


def test_v2_loads_a_file_with_records_and_samples_counted(tokenizers, tmp_path):
    tok = tokenizers["chatglm2-6b"]
    history = {"instruct": "", "query": TURNS[-1][0], "answer": TURNS[-1][1], "history": [list(t) for t in TURNS[:-1]]}
    path = write_lines(tmp_path / "t.txt", [history, {"instruct": "说", "query": "", "answer": "好"}])
    data = InstructionDataset(path, tok, "chatglm2-6b", max_source_length=30, max_target_length=64, loss_on_all_turns=True)
    assert data.stats["records"] == 2 and len(data) == 4
    assert data.describe().startswith(f"{path}: 4 samples from 2 records (one per learnt answer), ")
    assert "truncated prompts 2 (max_source_length)" in data.describe()  # the last two turns' prompts are over 30
    assert all(sum(label != -100 for label in sample["labels"]) for sample in data)

    # A tool-call conversation needs ChatGLM3-6B: named with its file and line, or skipped and counted.
    write_lines(path, [history, {"conversations": TOOL_CONVERSATION}])
    with pytest.raises(DataError) as err:
        InstructionDataset(path, tok, "chatglm2-6b")
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 2, "conversations")
    assert "need ChatGLM3-6B; chatglm2-6b learns alternating user and assistant turns" in str(err.value)
    data = InstructionDataset(path, tok, "chatglm2-6b", skip_bad_lines=True)
    assert data.stats["skipped_lines"] == 1 and len(data) == 1


def test_format_example_shows_tokens_ids_and_loss(tokenizers):
    tok = tokenizers["chatglm3-6b"]
    [example], *_ = encode_record({"instruct": "", "query": "你好", "answer": "你好！", "line": 1},
                                  get_prompt_format(tok, "chatglm3-6b"), 64, 32)
    assert format_example(example, tok) == (
        "14 tokens, 6 of them in the loss\n"
        "----  '[gMASK]' 64790, 'sop' 64792, '<|user|>' 64795, '▁' 30910, '<0x0A>' 13, '▁你' 36474, '好' 54591, "
        "'<|assistant|>' 64796\n"
        "loss  '▁' 30910, '<0x0A>' 13, '▁你' 36474, '好' 54591, '！' 31404, '</s>' 2")


# ---------------------------------------------------------------------------------------------------- process.py


def run_process(*args):
    return subprocess.run([sys.executable, "process.py", *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


EXPECTED_TOOL_RECORD = {"conversations": [
    {"role": "system", "content": "你是天气助手。", "tools": [WEATHER_TOOL]},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": BEIJING_CALL},
    {"role": "observation", "content": '{"temperature": 22}'},
    {"role": "assistant", "content": "北京现在 22 度。"},
]}
SHAREGPT = {"conversations": [
    {"from": "human", "value": "北京天气怎么样？"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}}, ensure_ascii=False)},
    {"from": "observation", "value": '{"temperature": 22}'},
    {"from": "gpt", "value": "北京现在 22 度。"},
], "system": "你是天气助手。", "tools": json.dumps([WEATHER_TOOL], ensure_ascii=False)}
OPENAI = {"messages": [
    {"role": "system", "content": "你是天气助手。"},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
    {"role": "assistant", "content": "北京现在 22 度。"},
], "tools": [{"type": "function", "function": WEATHER_TOOL}]}
PLAIN = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]}


def test_process_converts_sharegpt_and_openai_tool_calls(tokenizers, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [SHAREGPT, OPENAI, PLAIN])
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert ("train: 3 samples\n  with history: 0\n  conversation records (tool calls, unlearnt turns, ChatGLM3-format "
            "conversations): 2\n  skipped lines: 0") in result.stdout
    written = [json.loads(line) for line in (tmp_path / "out" / "train.txt").read_text(encoding="utf-8").splitlines()]
    assert written == [EXPECTED_TOOL_RECORD, EXPECTED_TOOL_RECORD, {"instruct": "", "query": "你好", "answer": "你好！"}]
    # Without a system prompt the tools get ChatGLM3's own tool prompt.
    no_system = {**OPENAI, "messages": OPENAI["messages"][1:]}
    write_lines(path, [no_system])
    assert run_process("--train_file", path, "--dev_file", "", "--output_dir", tmp_path / "o2").returncode == 0
    [record] = read_instruction_records(tmp_path / "o2" / "train.txt", conversations=True)
    assert record["conversations"][0]["content"].startswith("Answer the following questions as best as you can.")
    # What the training scripts read back and encode; predict.py (instruction records only) says what it got.
    data = InstructionDataset(tmp_path / "out" / "train.txt", tokenizers["chatglm3-6b"], "chatglm3-6b")
    assert len(data) == 3 and data[0] == data[1]
    with pytest.raises(DataError, match="field 'conversations': a conversation record; this reads instruction records"):
        read_instruction_records(tmp_path / "out" / "train.txt")


def test_openai_content_parts_are_their_text(tmp_path):
    """OpenAI content given as an array of parts is the text of its parts (joined as they are, as api_server.py reads
    them), for a tool result too (it was written as the JSON text of the array); an assistant's null content beside
    its tool call is no text."""
    messages = json.loads(json.dumps(OPENAI["messages"]))
    messages[1]["content"] = [{"type": "text", "text": "北京天气"}, {"type": "text", "text": "怎么样？"}]
    messages[3]["content"] = [{"type": "text", "text": '{"temperature": 22}'}]
    messages[4]["content"] = [{"type": "text", "text": "北京现在 22 度。"}]
    path = write_lines(tmp_path / "chat.jsonl", [{**OPENAI, "messages": messages}])
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    [written] = [json.loads(line) for line in (tmp_path / "out" / "train.txt").read_text(encoding="utf-8").splitlines()]
    assert written == EXPECTED_TOOL_RECORD


BAD_CONVERSATIONS = {
    # name: (bad record, its field, message part)
    "function_call_json": ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{name"}]},
                           "conversations[1].value", "not valid JSON"),
    "parallel_calls": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}] * 2}]}, "messages[1].tool_calls",
        "2 tool calls in one message: ChatGLM3 calls one tool at a time"),
    "argument_name": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"max-days": 3}'}}]}]},
        "messages[1].tool_calls[0].function.arguments", "'max-days' is not a Python identifier"),
    "observation_after_user": ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}]},
                               "conversations[1].from", "expected one of ['assistant'] after a user message, got 'observation'"),
    "no_observation": ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "metadata": "f", "content": "c"},
                                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]},
                       "conversations[2].role", "expected one of ['observation'] after a tool call"),
    "tools_type": ({**SHAREGPT, "tools": '{"name": "f"}'}, "tools", "expected a JSON array, got dict"),
    "loss_type": ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": "no"}]},
                  "conversations[1].loss", "expected true or false, got str"),
    # A lone surrogate in JSON text inside a field: found where that text is read, not as a crash at write time.
    "tools_text_surrogate": ({**SHAREGPT, "tools": json.dumps([{"name": "f", "description": "\ud800"}])},
                             "tools[0].description", "lone surrogate '\\ud800'"),
    "call_text_surrogate": ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": json.dumps(
        {"name": "f", "arguments": {"q": "x\udc00"}})}, {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]},
        "conversations[1].value.arguments.q", "lone surrogate '\\udc00'"),
    # No silent choice between two formats, and no dropped tool call.
    "conversations_and_messages": ({**PLAIN, "messages": OPENAI["messages"]}, "messages",
                                   "both conversations and messages: a record holds one conversation"),
    "from_and_role": ({"conversations": [{"from": "human", "role": "user", "value": "q"}, {"from": "gpt", "value": "a"}]},
                      "conversations[0]", "both 'from' (ShareGPT) and 'role'"),
    "value_and_content": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "content": "b"}]},
                          "conversations[1]", "both 'value' (ShareGPT) and 'content'"),
    "from_and_role_mixed": ({"conversations": [{"from": "human", "value": "q"}, {"role": "assistant", "content": "a"}]},
                            "conversations[1]", "ShareGPT from/value messages and role/content messages mixed"),
    "sharegpt_without_value": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
                               "conversations[1].value", "missing"),
    "tool_calls_on_user": ({"messages": [{"role": "user", "content": "q", "tool_calls": OPENAI["messages"][2]["tool_calls"]},
                                         {"role": "assistant", "content": "a"}]},
                           "messages[0].tool_calls", "a user message with tool_calls: only assistant messages call tools"),
    # OpenAI content: null is no text (only beside a tool call), and parts other than text have none for ChatGLM.
    "tool_result_null": ({"messages": [*OPENAI["messages"][:3], {"role": "tool", "content": None},
                                       OPENAI["messages"][4]]}, "messages[3].content",
                         "null; a tool message needs content (a string or an array of text parts)"),
    "image_part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]},
                                 {"role": "assistant", "content": "a"}]}, "messages[0].content[0].type",
                   "a content part of type 'image_url'; ChatGLM reads text parts only"),
    # ChatGLM3's finetune_demo tool message: name, parameters and observation, each required.
    "finetune_tool_without_observation": ({"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "name": "f",
                                           "parameters": {}}, {"role": "assistant", "content": "a"}]},
                                          "conversations[1].observation", "missing"),
    "finetune_tool_with_content": ({"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                                                      {"role": "assistant", "content": "a"}]}, "conversations[1].content",
                                   "a ChatGLM3 tool message has name, parameters and observation, not content"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_bad_conversations_name_file_line_and_field(tmp_path, case):
    record, field, message = BAD_CONVERSATIONS[case]
    path = write_lines(tmp_path / "chat.jsonl", [SHAREGPT, record, PLAIN])
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr.startswith(f"error: {path}:2: field {field!r}: "), result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", tmp_path / "out", "--skip_bad_lines")
    assert result.returncode == 0 and "train: 2 samples" in result.stdout
    assert f"skipped lines: 1\n    1 x field " in result.stdout and f"(at {path}:2)" in result.stdout


def test_training_files_take_only_the_chatglm3_format(tokenizers, tmp_path):
    path = write_lines(tmp_path / "train.txt", [EXPECTED_TOOL_RECORD, {"conversations": SHAREGPT["conversations"]}])
    bad = BadLines(skip=True)
    assert len(read_instruction_records(path, bad, conversations=True)) == 1 and bad.count == 1
    with pytest.raises(DataError) as err:
        read_instruction_records(path, conversations=True)
    assert (err.value.line, err.value.field) == (2, "conversations[0].role")
    assert "missing (ShareGPT's from/value: convert the file with process.py)" in str(err.value)
    write_lines(path, [{"conversations": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=r"field 'conversations\[0\].role': expected one of \['system', 'user', 'assistant', "):
        read_instruction_records(path, conversations=True)
    # OpenAI messages: named, with the way to convert them; a record with both keys is no silent choice either.
    write_lines(path, [OPENAI])
    with pytest.raises(DataError, match=r"field 'messages': an OpenAI messages record; the training scripts read ChatGLM3 "
                       r"conversation records: convert the file with process.py \(--input_format=conversation\)"):
        read_instruction_records(path, conversations=True)
    write_lines(path, [{**EXPECTED_TOOL_RECORD, "messages": OPENAI["messages"]}])
    with pytest.raises(DataError, match="field 'messages': both conversations and messages"):
        read_instruction_records(path, conversations=True)

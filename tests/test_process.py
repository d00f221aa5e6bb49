"""process.py and utils/ner_data.py: every raw format from ../shared/data converts to the expected records, the
printed counts match the files, bad input stops naming file, line and field (or is skipped and counted), output is
never overwritten by accident, and the committed demo data is exactly what its generator and process.py make.
"""
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_script
from utils import chat_data, ner_data
from utils.data_io import BadLines, DataError, iter_json_lines
from utils.records import read_instruction_records

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MSRA, CLUENER = DATA / "msra", DATA / "cluener"
DEMO = REPO / "data" / "demo_ner"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def run_process(*args):
    return run_script("process.py", *args, check=False, timeout=60)


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def ner_records(reader, path, input_format, bad_lines=None, instruct=ner_data.MSRA_INSTRUCT):
    out = []
    for _, text, entities in reader(path, bad_lines):
        mapped, _ = ner_data.map_types(entities, input_format)
        out.append(ner_data.ner_record(text, mapped, instruct))
    return out


# ---------------------------------------------------------------------------------------------------- units


def test_tag_spans_bio_and_bmes():
    assert ner_data.tag_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]) == ([(0, 2, "PER"), (3, 4, "LOC"), (4, 6, "LOC")], [])
    assert ner_data.tag_spans(["B-ORG", "M-ORG", "E-ORG", "S-NAME", "O"], closed=True) == ([(0, 3, "ORG"), (3, 4, "NAME")], [])
    # BIO, read as conlleval and seqeval (default mode) read it: an I- tag after O, at the start, or after an entity of
    # another type opens an entity of its own type; each such tag is returned for the caller to count.
    spans, repaired = ner_data.tag_spans(["I-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-PER", "I-PER", "B-LOC", "I-ORG"])
    assert spans == [(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "ORG"), (5, 7, "PER"), (7, 8, "LOC"), (8, 9, "ORG")]
    assert [(e.index, str(e)) for e in repaired] == [
        (0, "I- tag does not continue an entity of its type (after the sentence start)"),
        (3, "I- tag does not continue an entity of its type (after O)"),
        (5, "I- tag does not continue an entity of its type (after B-ORG)"),
        (8, "I- tag does not continue an entity of its type (after B-LOC)")]
    assert {e.reason for e in repaired} == {"I- tag does not continue an entity of its type"}
    # BIOES / BMES mark both ends of every entity: there a piece without its start is an error.
    with pytest.raises(ner_data.TagError, match="does not continue") as err:
        ner_data.tag_spans(["O", "M-PER", "E-PER"], closed=True)
    assert err.value.index == 1
    with pytest.raises(ner_data.TagError, match="does not continue"):
        ner_data.tag_spans(["B-PER", "E-LOC"], closed=True)
    with pytest.raises(ner_data.TagError, match="malformed tag 'X-PER'"):
        ner_data.tag_spans(["X-PER"])
    with pytest.raises(ner_data.TagError, match="not closed"):
        ner_data.tag_spans(["B-ORG", "M-ORG", "O"], closed=True)


def test_answer_dedup_order_and_types():
    entities = [("北京", "地名", 9), ("张三", "人名", 0), ("北京", "地名", 2), ("北京", "机构名", 12)]
    assert ner_data.ner_answer(entities) == "张三_人名\n北京_地名\n北京_机构名"
    assert ner_data.ner_answer([]) == "没有"
    record = ner_data.ner_record("张三去北京", [("张三", "人名", 0)])
    assert record == {"instruct": ner_data.MSRA_INSTRUCT, "query": "文本：张三去北京", "answer": "张三_人名"}
    assert [ner_data.map_type(t) for t in ("PER", "loc", "GPE.NAM", "PER.NOM", "ORG.NOM", "NAME", "EDU", "DATE")] == [
        "人名", "地名", "行政区名", "人物泛称", "机构泛称", "人名", "学历", None]
    assert ner_data.map_type("scene", "cluener") == "景点" and ner_data.map_type("PER", "cluener") is None
    assert ner_data.map_types([("今天", "DATE", 0), ("王五", "NAME", 3)]) == ([("今天", "DATE", 0), ("王五", "人名", 3)], ["DATE"])
    assert ner_data.choose_instruct(["人名", "地名"]) == ner_data.MSRA_INSTRUCT
    assert ner_data.choose_instruct(["人名"], {"cluener"}) == ner_data.CLUENER_INSTRUCT
    assert ner_data.choose_instruct(["DATE", "人名", "人物泛称", "DATE"]) == ner_data.ner_instruct(["人名", "人物泛称", "DATE"])
    for name in ner_data.CLUENER_TYPE_NAMES.values():
        assert name in ner_data.CLUENER_INSTRUCT


# ---------------------------------------------------------------------------------------------------- real data


def test_msra_span_json_matches_seed_conversion():
    path = MSRA / "ori_data" / "msra_1000.txt"
    assert ner_data.detect_format(path) == "span_json"
    examples = list(ner_data.read_span_json(path))
    assert len(examples) == 1000
    line, text, entities = examples[2]
    assert line == 3 and text.startswith("因有关日寇在京掠夺文物详情")
    assert entities == [("日", "LOC", 3), ("京", "LOC", 6), ("北京", "LOC", 27)]  # end exclusive: text[3:4] == "日"
    records = ner_records(ner_data.read_span_json, path, "span_json")
    assert records[2]["answer"] == "日_地名\n京_地名\n北京_地名"
    seed = {r["query"]: r["answer"] for r in read_jsonl(MSRA / "instruct_data" / "dev.txt")}
    assert len(seed) == 1000 and {r["query"] for r in records} == set(seed)
    assert [r["answer"] for r in records] == [seed[r["query"]] for r in records]
    assert sum(r["answer"] == "没有" for r in records) == 656


def test_msra_bio_test_first_sentence():
    path = MSRA / "bio" / "test.txt"
    assert ner_data.detect_format(path) == "bio"
    records = ner_records(ner_data.read_bio, path, "bio")
    assert len(records) == 3442
    assert records[0]["query"].startswith("文本：中共中央致中国致公党十一大的贺词各位代表")
    assert records[0]["answer"] == ("中共中央_机构名\n中国致公党十一大_机构名\n中国致公党第十一次全国代表大会_机构名\n"
                                    "中国共产党中央委员会_机构名\n致公党_机构名")
    assert records[1]["answer"] == "致公党_机构名\n邓小平_人名\n致公党十大_机构名"
    # Empty answers are exactly the sentences whose tags are all O (counted here without the parser).
    blocks = [b for b in (MSRA / "bio" / "test.txt").read_text(encoding="utf-8").split("\n\n") if b.strip()]
    all_o = sum(all(line.split("\t")[1] == "O" for line in b.strip("\n").split("\n")) for b in blocks)
    assert sum(r["answer"] == "没有" for r in records) == all_o == 1467


def test_msra_parallel_val():
    path = MSRA / "bio" / "val_sentences.txt"
    assert ner_data.detect_format(path) == "bio_parallel"
    records = ner_records(ner_data.read_bio_parallel, path, "bio_parallel")
    assert len(records) == 3000
    assert records[0]["answer"] == "江苏_地名\n如皋市_地名\n城西乡_地名"
    assert records[2]["answer"] == "黄登仁_人名\n洪泽县委_机构名\n沭阳县委_机构名\n宿迁市_地名"
    # 52 val sentences are also in the seed project's conversion of msra_1000: same answers, but for one sentence
    # whose two annotations differ (val's tags also mark 汉口 as a place).
    seed = {r["query"]: r["answer"] for r in read_jsonl(MSRA / "instruct_data" / "dev.txt")}
    shared = [r for r in records if r["query"] in seed]
    assert len(shared) == 52
    differ = [(r["answer"], seed[r["query"]]) for r in shared if r["answer"] != seed[r["query"]]]
    assert differ == [("汉口_地名\n界限路_地名\n圣罗以女子中学_机构名", "界限路_地名\n圣罗以女子中学_机构名")]


def test_cluener_first_dev_record():
    path = CLUENER / "dev.json"
    assert ner_data.detect_format(path) == "cluener"
    records = ner_records(ner_data.read_cluener, path, "cluener", instruct=ner_data.CLUENER_INSTRUCT)
    assert len(records) == 1343
    assert records[0] == {"instruct": ner_data.CLUENER_INSTRUCT,
                          "query": "文本：彭小军认为，国内银行现在走的是台湾的发卡模式，先通过跑马圈地再在圈的地里面选择客户，",
                          "answer": "彭小军_人名\n台湾_地址"}
    assert records[2]["answer"] == "突袭黑暗雅典娜》_游戏\nRiddick_人名\nJohns_人名"


def test_peoples_daily_weibo_resume():
    daily = list(ner_data.read_bio(DATA / "peoples_daily" / "example.dev"))
    assert len(daily) == 2318
    first = next(e for e in daily if e[2])
    assert first[0] == 71 and first[2] == [("青岛海牛队", "ORG", 5), ("广州松日队", "ORG", 11)]

    weibo = list(ner_data.read_bio(DATA / "weibo_ner" / "weiboNER_2nd_conll.dev"))
    assert len(weibo) == 270 and weibo[0][1] == "口腔溃疡加上这玩意～酸酸甜甜好滋味。"  # segment digits dropped
    line, text, entities = next(e for e in weibo if e[2])
    assert (line, text) == (111, "老百姓心新乡新闻网话说这几天新乡天气还好吧偷笑")
    assert ner_data.ner_answer(ner_data.map_types(entities)[0]) == "老百姓_人物泛称\n新乡_行政区名"
    assert not any(ch.isdigit() for _, text, _ in weibo[:20] for ch in text)

    resume = list(ner_data.read_bio(DATA / "resume_ner" / "dev.char.bmes"))
    assert len(resume) == 463
    mapped, unmapped = ner_data.map_types(resume[0][2])
    assert ner_data.ner_answer(mapped).split("\n")[:4] == ["吴重阳_人名", "中国国籍_国籍", "大学本科_学历", "教授级高工_职称"]
    assert not unmapped  # every Resume type has a Chinese name
    every_type = {raw for _, _, entities in resume for _, raw, _ in entities}
    assert every_type == {"NAME", "CONT", "RACE", "EDU", "PRO", "TITLE", "ORG", "LOC"}
    assert not ner_data.map_types([e for _, _, entities in resume for e in entities])[1]


WEIBO_TYPES = {"PER.NAM": "人名", "PER.NOM": "人物泛称", "LOC.NAM": "地名", "LOC.NOM": "地点泛称",
               "GPE.NAM": "行政区名", "GPE.NOM": "地区泛称", "ORG.NAM": "机构名", "ORG.NOM": "机构泛称"}


def test_weibo_keeps_its_eight_types_apart(tmp_path):
    """Weibo NER's 8 standard types (PER/ORG/LOC/GPE x NAM/NOM, as published results score them) get 8 distinct type
    names, so every answer maps back to the annotation: the (entity, raw type) pairs of each sentence, exactly."""
    files = {"train": DATA / "weibo_ner" / "weiboNER_2nd_conll.train", "dev": DATA / "weibo_ner" / "weiboNER_2nd_conll.dev"}
    result = run_process("--data_name", "weibo", "--train_file", files["train"], "--dev_file", files["dev"],
                         "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "types written under one name" not in result.stdout
    raw_name = {name: raw for raw, name in WEIBO_TYPES.items()}
    assert len(raw_name) == 8
    for split, path in files.items():
        raw = [{(entity, kind) for entity, kind, _ in entities} for _, _, entities in ner_data.read_bio(path)]
        assert {kind for pairs in raw for _, kind in pairs} == set(WEIBO_TYPES)  # all 8 occur in both files
        records = read_jsonl(tmp_path / f"{split}.txt")
        back = [set() if r["answer"] == ner_data.NO_ENTITY
                else {(entity, raw_name[name]) for entity, name in (line.rsplit("_", 1) for line in r["answer"].split("\n"))}
                for r in records]
        assert back == raw
        assert all(name in records[0]["instruct"] for name in WEIBO_TYPES.values())
    # Types that do share a name (here LOC and LOCATION, both places) are said so, not merged silently.
    both = write(tmp_path / "b.txt", "北\tB-LOC\n京\tI-LOC\n\n上\tB-LOCATION\n海\tI-LOCATION\n")
    result = run_process("--train_file", both, "--dev_file", "", "--output_dir", tmp_path / "b")
    assert result.returncode == 0 and "types written under one name: 地名 <- LOC, LOCATION" in result.stdout


def test_bad_real_bio_sentences_stop_or_are_counted():
    path = DATA / "resume_ner" / "train.char.bmes"
    with pytest.raises(DataError) as err:
        list(ner_data.read_bio(path))
    assert (err.value.line, err.value.field) == (62390, "tag") and "not closed with E-" in str(err.value)
    bad = BadLines(skip=True)
    assert len(list(ner_data.read_bio(path, bad))) == 3817 and bad.count == 5


def test_weibo_i_tags_without_b_open_entities(tmp_path):
    """Weibo NER's train file has I- tags after O (and one I-PER.NOM right after I-PER.NAM), as many CoNLL files do:
    read as conlleval reads them by default (counted, per split), an error with --strict_tags."""
    path = DATA / "weibo_ner" / "weiboNER_2nd_conll.train"
    bad = BadLines()
    weibo = {line: (text, entities) for line, text, entities in ner_data.read_bio(path, bad)}
    assert len(weibo) == 1350 and bad.count == 0 and bad.repaired.total == 10
    assert bad.repaired.counts == {"field 'tag': I- tag does not continue an entity of its type": 10}
    assert bad.repaired.examples[next(iter(bad.repaired.counts))] == [f"{path}:1266", f"{path}:22000", f"{path}:24537"]
    text, entities = weibo[1259]  # 雯子 B-PER.NAM I-PER.NAM, then 小菇凉 I-PER.NOM (line 1266): two entities
    assert text.startswith("我就是激动雯子小菇凉") and entities[:2] == [("雯子", "PER.NAM", 5), ("小菇凉", "PER.NOM", 7)]
    line = max(n for n in weibo if n <= 22000)  # ... 博 O, 粉 I-PER.NOM (line 22000), 丝 I-PER.NOM
    assert ("粉丝", "PER.NOM", 22000 - line) in weibo[line][1]

    strict = BadLines(strict_tags=True)
    with pytest.raises(DataError) as err:
        list(ner_data.read_bio(path, strict))
    assert (err.value.line, err.value.field) == (1266, "tag") and "(after I-PER.NAM)" in str(err.value)
    strict = BadLines(skip=True, strict_tags=True)
    assert len(list(ner_data.read_bio(path, strict))) == 1342 and strict.count == 8 and strict.repaired.total == 0

    dev = DATA / "weibo_ner" / "weiboNER_2nd_conll.dev"
    result = run_process("--data_name", "weibo", "--train_file", path, "--dev_file", dev, "--output_dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    train_report, dev_report = result.stdout.split("\ntrain: 1350 samples\n")[1].split("\ndev: 270 samples\n")
    assert (f"  skipped lines: 0\n  repaired: 10\n    10 x field 'tag': I- tag does not continue an entity of its type "
            f"(at {path}:1266, {path}:22000, {path}:24537, ...)") in train_report
    assert "repaired" not in dev_report.split("\nrepaired: an I- tag")[0]  # the dev file has none
    assert "--strict_tags stops on such tags instead" in result.stdout
    assert len(read_jsonl(tmp_path / "o" / "train.txt")) == 1350
    result = run_process("--data_name", "weibo", "--train_file", path, "--dev_file", dev, "--output_dir", tmp_path / "s",
                         "--strict_tags")
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: {path}:1266: field 'tag': I- tag does not continue an entity of its type (after I-PER.NAM)")
    assert "--skip_bad_lines skips such lines" in result.stderr and not (tmp_path / "s").exists()


def test_adgen_both_layouts():
    first = DATA / "adgen" / "dev_content_summary.json"
    second = DATA / "adgen" / "dev_instruction_output.jsonl"
    assert ner_data.detect_format(first) == ner_data.detect_format(second) == "adgen"
    records = [r for _, r in chat_data.read_adgen(first)]
    assert len(records) == 1070 and records == [r for _, r in chat_data.read_adgen(second)]
    assert records[0]["instruct"] == chat_data.ADGEN_INSTRUCT
    assert records[0]["query"] == "类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞"
    assert records[0]["answer"].startswith("简约而不简单的牛仔外套，白色的衣身十分百搭。")


def test_alpaca():
    path = DATA / "alpaca_zh" / "alpaca_zh_demo_llamafactory.json"
    assert ner_data.detect_format(path) == "alpaca"
    records = [r for _, r in chat_data.read_alpaca(path)]
    assert len(records) == 1000
    assert records[1] == {"instruct": "输入三支篮球队的名称并生成一个适当的口号。",
                          "query": "输入：俄克拉荷马城雷霆队，芝加哥公牛队，布鲁克林网队。",
                          "answer": '输出： "雷霆，公牛和网队：各显神通，角逐群雄!"'}
    other = DATA / "alpaca_zh" / "alpaca_chinese_dataset_part00_first1000.json"
    with pytest.raises(DataError) as err:  # record 285 has an empty output
        list(chat_data.read_alpaca(other))
    assert (err.value.line, err.value.field, err.value.problem) == ("record 285", "output", "empty")
    bad = BadLines(skip=True)
    assert len(list(chat_data.read_alpaca(other, bad))) == 999 and bad.count == 1


def test_history_alpaca_and_conversation(tmp_path):
    llama = write(tmp_path / "llama.json", json.dumps([{"instruction": "再说一遍", "input": "", "output": "好的：你好",
                                                          "history": [["说你好", "你好"]]}], ensure_ascii=False))
    assert [r for _, r in chat_data.read_alpaca(llama)] == [
        {"instruct": "再说一遍", "query": "", "answer": "好的：你好", "history": [["说你好", "你好"]]}]
    chats = [
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                           {"from": "human", "value": "1+1=?"}, {"from": "gpt", "value": "2"}]},
        {"messages": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "在吗"},
                      {"role": "assistant", "content": "在"}]},
    ]
    path = write(tmp_path / "chat.jsonl", "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    assert ner_data.detect_format(path) == "conversation"
    assert [r for _, r in chat_data.read_conversation(path)] == [
        {"instruct": "", "query": "1+1=?", "answer": "2", "history": [["你好", "你好！"]]},
        {"instruct": "你是助手", "query": "在吗", "answer": "在"},
    ]
    out = tmp_path / "out"
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", out)
    assert result.returncode == 0, result.stderr
    assert "train: 2 samples\n  with history: 1\n  skipped lines: 0" in result.stdout
    assert read_jsonl(out / "train.txt")[0]["history"] == [["你好", "你好！"]]
    assert not (out / "dev.txt").exists()


# ---------------------------------------------------------------------------------------------------- process.py


def test_process_counts_and_files(tmp_path):
    span = [
        {"text": "张三在北京工作。", "entity_list": [
            {"entity_index": {"begin": 3, "end": 5}, "entity_type": "LOC", "entity": "北京"},
            {"entity_index": {"begin": 0, "end": 2}, "entity_type": "PER", "entity": "张三"}]},
        {"text": "今天天气很好。", "entity_list": []},
        {"text": "北京和北京大学", "entity_list": [
            {"entity_index": {"begin": 0, "end": 2}, "entity_type": "LOC", "entity": "北京"},
            {"entity_index": {"begin": 3, "end": 7}, "entity_type": "ORG", "entity": "北京大学"},
            {"entity_index": {"begin": 3, "end": 5}, "entity_type": "LOC", "entity": "北京"}]},
    ]
    train = write(tmp_path / "train.json", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in span))
    dev = write(tmp_path / "dev.txt", "李\tB-PER\n四\tI-PER\n好\tO\n\n无\tO\n\n去\tO\n上\tB-LOC\n海\tI-LOC\n")
    out = tmp_path / "out"
    result = run_process("--data_name", "tiny", "--train_file", train, "--dev_file", dev, "--output_dir", out)
    assert result.returncode == 0, result.stderr
    assert f"train: {train} (span_json): 3 samples" in result.stdout
    assert f"dev: {dev} (bio): 3 samples" in result.stdout
    assert ("train: 3 samples\n  entities by type: 地名 2, 人名 1, 机构名 1\n  empty answers (没有): 1\n"
            "  truncated texts: 0 (entities dropped: 0)\n  skipped lines: 0") in result.stdout
    assert "dev: 3 samples\n  entities by type: 人名 1, 地名 1\n  empty answers (没有): 1" in result.stdout
    instruct = ner_data.MSRA_INSTRUCT
    assert read_jsonl(out / "train.txt") == [
        {"instruct": instruct, "query": "文本：张三在北京工作。", "answer": "张三_人名\n北京_地名"},
        {"instruct": instruct, "query": "文本：今天天气很好。", "answer": "没有"},
        {"instruct": instruct, "query": "文本：北京和北京大学", "answer": "北京_地名\n北京大学_机构名"},
    ]
    assert [r["answer"] for r in read_jsonl(out / "dev.txt")] == ["李四_人名", "没有", "上海_地名"]

    # max_text_chars cuts texts and drops the entities past the cut, and says so.
    result = run_process("--train_file", train, "--dev_file", "", "--output_dir", tmp_path / "cut", "--max_text_chars", 4)
    assert "truncated texts: 3 (entities dropped: 3)" in result.stdout
    assert [r["answer"] for r in read_jsonl(tmp_path / "cut" / "train.txt")] == ["张三_人名", "没有", "北京_地名"]


def test_process_unmapped_types_are_kept_and_reported(tmp_path):
    bmes = write(tmp_path / "r.char.bmes", "王 B-NAME\n五 E-NAME\n读 O\n今 B-DATE\n天 E-DATE\n\n汉 S-RACE\n元 S-MONEY\n")
    result = run_process("--train_file", bmes, "--dev_file", "", "--output_dir", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert "types kept as raw names (no mapping): DATE 1, MONEY 1" in result.stdout
    records = read_jsonl(tmp_path / "o" / "train.txt")
    assert [r["answer"] for r in records] == ["王五_人名\n今天_DATE", "汉_民族\n元_MONEY"]
    assert records[0]["instruct"] == ner_data.ner_instruct(["人名", "DATE", "民族", "MONEY"])


def test_process_msra_and_cluener_commands(tmp_path):
    result = run_process("--data_name", "msra", "--train_file",
                         f"{MSRA / 'bio' / 'val_sentences.txt'},{MSRA / 'ori_data' / 'msra_1000.txt'}",
                         "--dev_file", MSRA / "bio" / "test.txt", "--output_dir", tmp_path / "msra")
    assert result.returncode == 0, result.stderr
    assert "train: 4000 samples" in result.stdout and "dev: 3442 samples" in result.stdout
    assert "empty answers (没有): 1467" in result.stdout
    train = read_jsonl(tmp_path / "msra" / "train.txt")
    assert len(train) == 4000 and train[0]["answer"] == "江苏_地名\n如皋市_地名\n城西乡_地名"
    assert train[3002]["answer"] == "日_地名\n京_地名\n北京_地名"
    assert {r["instruct"] for r in train} == {ner_data.MSRA_INSTRUCT}

    result = run_process("--data_name", "cluener", "--train_file", CLUENER / "train.json", "--dev_file",
                         CLUENER / "dev.json", "--output_dir", tmp_path / "cluener")
    assert result.returncode == 0, result.stderr
    assert "train: 10748 samples" in result.stdout and "dev: 1343 samples" in result.stdout
    dev = read_jsonl(tmp_path / "cluener" / "dev.txt")
    assert dev[0]["answer"] == "彭小军_人名\n台湾_地址" and dev[0]["instruct"] == ner_data.CLUENER_INSTRUCT
    # entities by type count distinct (entity, type) per sample: the answers' lines.
    counted = Counter(line.rpartition("_")[2] for r in dev if r["answer"] != "没有" for line in r["answer"].split("\n"))
    assert "  entities by type: " + ", ".join(f"{t} {n}" for t, n in counted.most_common()) in result.stdout


def test_mention_replacement_on_msra_keeps_spans_and_types(tmp_path):
    examples = []
    for input_format, path in (("bio_parallel", MSRA / "bio" / "val_sentences.txt"), ("span_json", MSRA / "ori_data" / "msra_1000.txt")):
        for _, text, entities in ner_data.READERS[input_format](path, None):
            examples.append((text, ner_data.map_types(entities, input_format)[0]))
    pool = {(entity, name) for _, entities in examples for entity, name, _ in entities}
    augmented, left_out = ner_data.replace_mentions(examples, 2, seed=1)
    with_entities = [e for e in examples if e[1]]
    assert left_out == 0 and len(augmented) == 2 * len(with_entities) == 4422
    changed = 0
    for (text, entities), (new_text, new_entities) in zip([e for e in with_entities for _ in range(2)], augmented):
        assert [name for _, name, _ in sorted(entities, key=lambda e: e[2])] == [name for _, name, _ in new_entities]
        for entity, name, begin in new_entities:
            assert new_text[begin:begin + len(entity)] == entity and (entity, name) in pool
        # the text around the mentions is kept: removing the mentions leaves the same context
        def context(t, ents):
            return [t[a[2] + len(a[0]):b[2]] for a, b in itertools.pairwise(ents)]
        assert context(text, sorted(entities, key=lambda e: e[2])) == context(new_text, new_entities)
        changed += new_text != text
    assert changed > 0.9 * len(augmented)
    assert ner_data.replace_mentions(examples, 2, seed=1) == (augmented, left_out)  # deterministic
    # Overlapping mentions cannot be swapped one by one: such an example is counted, not augmented.
    assert ner_data.replace_mentions([("北京大学", [("北京大学", "机构名", 0), ("北京", "地名", 0)])], 3) == ([], 1)

    result = run_process("--data_name", "msra", "--train_file",
                         f"{MSRA / 'bio' / 'val_sentences.txt'},{MSRA / 'ori_data' / 'msra_1000.txt'}",
                         "--dev_file", MSRA / "bio" / "test.txt", "--output_dir", tmp_path / "msra", "--augment_copies", "2")
    assert result.returncode == 0, result.stderr
    assert "train: 4422 examples added by mention replacement" in result.stdout and "train: 8422 samples" in result.stdout
    train, dev = read_jsonl(tmp_path / "msra" / "train.txt"), read_jsonl(tmp_path / "msra" / "dev.txt")
    assert len(train) == 8422 and len(dev) == 3442  # dev (the test set) is never augmented
    for record in train:
        text = record["query"].removeprefix(ner_data.QUERY_PREFIX)
        assert record["answer"] == "没有" or all(line.rpartition("_")[0] in text for line in record["answer"].split("\n"))


GOOD_SPAN = '{"text": "张三来了", "entity_list": [{"entity_index": {"begin": 0, "end": 2}, "entity_type": "PER", "entity": "张三"}]}\n'
BAD_CASES = {
    # name: (file name, content with the bad record on line 2, expected line, expected field, message part)
    "malformed_json": ("a.json", GOOD_SPAN + '{"text": "李四", "entity_list": [\n' + GOOD_SPAN, 2, None, "not valid JSON"),
    "missing_field": ("a.json", GOOD_SPAN + '{"entity_list": []}\n' + GOOD_SPAN, 2, "text", "missing"),
    "wrong_type": ("a.json", GOOD_SPAN + '{"text": 5, "entity_list": []}\n' + GOOD_SPAN, 2, "text", "expected a string, got int"),
    "entity_list_type": ("a.json", GOOD_SPAN + '{"text": "好", "entity_list": {}}\n' + GOOD_SPAN, 2, "entity_list", "expected a JSON array"),
    "span_mismatch": ("a.json", GOOD_SPAN + '{"text": "我见到王五", "entity_list": [{"entity_index": {"begin": 2, "end": 4}, '
                      '"entity_type": "PER", "entity": "王五"}]}\n' + GOOD_SPAN, 2, "entity_list[0].entity_index", "gives '到王'"),
    "span_inclusive": ("a.json", GOOD_SPAN + '{"text": "王五好", "entity_list": [{"entity_index": {"begin": 0, "end": 1}, '
                       '"entity_type": "PER", "entity": "王五"}]}\n' + GOOD_SPAN, 2, "entity_list[0].entity_index", "end inclusive"),
    "span_out_of_range": ("a.json", GOOD_SPAN + '{"text": "张三", "entity_list": [{"entity_index": {"begin": 1, "end": 10}, '
                          '"entity_type": "PER", "entity": "三"}]}\n' + GOOD_SPAN, 2, "entity_list[0].entity_index",
                          "begin=1, end=10 is out of range: the text has 2 characters (0 <= begin < end <= 2)"),
    "cluener_span": ("c.json", '{"text": "王五好", "label": {"name": {"王五": [[0, 1]]}}}\n{"text": "王五好", "label": {"name": {"王五": [[0, 2]]}}}\n'
                     '{"text": "好", "label": {}}\n', 2, "label.name", "[0, 2] gives '王五好', not the entity '王五'"),
    "cluener_out_of_range": ("c.json", '{"text": "王五好", "label": {"name": {"王五": [[0, 1]]}}}\n{"text": "王五", "label": {"name": '
                             '{"王五": [[0, 2]]}}}\n{"text": "好", "label": {}}\n', 2, "label.name",
                             "[0, 2] for the entity '王五' is out of range: the text has 2 characters (0 <= begin <= end < 2) "
                             "(it matches with end exclusive, but CLUENER ends are inclusive)"),
    "empty_output": ("g.jsonl", '{"instruction": "说", "input": "", "output": "好"}\n{"instruction": "说", "input": "", "output": " "}\n'
                     '{"instruction": "写", "output": "嗯"}\n', 2, "output", "empty"),
    "adgen_empty": ("adgen.json", '{"content": "类型#裙", "summary": "好看"}\n{"content": "类型#裤", "summary": ""}\n'
                    '{"content": "类型#鞋", "summary": "舒服"}\n', 2, "summary", "empty"),
    "conversation_role": ("chat.jsonl", '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'
                          '{"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'
                          '{"conversations": [{"from": "user", "value": "c"}, {"from": "assistant", "value": "d"}]}\n',
                          2, "conversations[0].from", "expected one of"),
    "bio_bad_tag": ("b.txt", "张\tB-PER\n三\tI-PER\n\n李\tX-PER\n四\tI-PER\n\n好\tO\n", 4, "tag", "malformed tag 'X-PER'"),
    "bioes_e_after_o": ("b.txt", "张\tB-PER\n三\tE-PER\n\n李\tO\n四\tE-PER\n\n好\tO\n", 5, "tag", "does not continue"),
    "bio_columns": ("b.txt", "张\tB-PER\n三\tI-PER\n\n李\tO\tO\n四\tO\n\n好\tO\n", 4, "tag", "expected 'character<TAB>tag'"),
    "encoding": ("e.json", (GOOD_SPAN + GOOD_SPAN).encode() + b'{"text": "\xb9\xfa", "entity_list": []}\n', 3, None, "not valid UTF-8"),
    # What the answer line `entity_type` cannot carry and parse back (it was written, and scored as another entity):
    "type_with_underscore": ("a.json", GOOD_SPAN + '{"text": "张三来了", "entity_list": [{"entity_index": {"begin": 0, "end": 2}, '
                             '"entity_type": "PER_X", "entity": "张三"}]}\n' + GOOD_SPAN, 2, "entity_list[0].entity_type",
                             "the type 'PER_X' has no Chinese name, so it is written as it is, and its underscore"),
    "entity_with_line_break": ("a.json", GOOD_SPAN + '{"text": "张\\n三来", "entity_list": [{"entity_index": {"begin": 0, '
                               '"end": 3}, "entity_type": "PER", "entity": "张\\n三"}]}\n' + GOOD_SPAN, 2,
                               "entity_list[0].entity", "holds a line break, which would split its answer line"),
    "bio_type_with_underscore": ("b.txt", "张\tB-PER\n三\tI-PER\n\n好\tO\n李\tB-PER_X\n四\tI-PER_X\n\n好\tO\n", 5, "tag",
                                 "the type 'PER_X' has no Chinese name"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_stops_with_file_line_field(tmp_path, case):
    name, content, line, field, message = BAD_CASES[case]
    path = write(tmp_path / name, content)
    out = tmp_path / "out"
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", out)
    assert result.returncode == 1 and result.stdout.count("wrote") == 0
    expected = f"error: {path}:{line}: " + (f"field {field!r}: " if field else "")
    assert expected in result.stderr and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "gives '三', not the entity '三'" not in result.stderr
    # the hint only where skipping would help: a file that is not UTF-8 cannot be read at all
    assert ("(--skip_bad_lines skips such lines and counts them)" in result.stderr) == (case != "encoding")
    assert not out.exists()
    if case == "encoding":
        return  # an undecodable file cannot be read at all: it always stops
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", out, "--skip_bad_lines")
    assert result.returncode == 0, result.stderr
    assert "train: 2 samples" in result.stdout
    assert f"skipped lines: 1\n    1 x " in result.stdout and f"(at {path}:{line})" in result.stdout
    assert len(read_jsonl(out / "train.txt")) == 2


def test_parallel_files(tmp_path):
    sentences = write(tmp_path / "x_sentences.txt", "张 三 来 了\n好 的\n李 四\n")
    tags = write(tmp_path / "x_tags.txt", "B-PER I-PER O O\nO\nB-PER I-PER\n")
    result = run_process("--train_file", sentences, "--dev_file", "", "--output_dir", tmp_path / "o")
    assert result.returncode == 1
    assert f"error: {tags}:2: field 'tags': 1 tags for the 2 characters" in result.stderr
    result = run_process("--train_file", sentences, "--dev_file", "", "--output_dir", tmp_path / "o", "--skip_bad_lines")
    assert [r["answer"] for r in read_jsonl(tmp_path / "o" / "train.txt")] == ["张三_人名", "李四_人名"]
    assert "skipped lines: 1" in result.stdout
    write(tags, "B-PER I-PER O O\nO O\n")  # one line short: the files no longer pair up, even with --skip_bad_lines
    result = run_process("--train_file", sentences, "--dev_file", "", "--output_dir", tmp_path / "p", "--skip_bad_lines")
    assert result.returncode == 1 and f"{tags}:3: field 'tags': 2 lines of tags but 3 sentences" in result.stderr
    result = run_process("--train_file", sentences, "--dev_file", "", "--output_dir", tmp_path / "p")
    assert result.returncode == 1 and "2 lines of tags" in result.stderr and "--skip_bad_lines" not in result.stderr
    write(tags, "B-PER I-PER O O\nO O\nO I-PER\n")  # the same BIO reading as read_bio: 四 opens a PER entity
    result = run_process("--train_file", sentences, "--dev_file", "", "--output_dir", tmp_path / "q")
    assert result.returncode == 0 and [r["answer"] for r in read_jsonl(tmp_path / "q" / "train.txt")] == ["张三_人名", "没有", "四_人名"]
    assert f"repaired: 1\n    1 x field 'tags': I- tag does not continue an entity of its type (at {tags}:3)" in result.stdout


def test_no_overwrite_without_flag(tmp_path):
    train = write(tmp_path / "t.json", GOOD_SPAN)
    out = tmp_path / "out"
    out.mkdir()
    write(out / "train.txt", "keep me\n")
    result = run_process("--train_file", train, "--dev_file", "", "--output_dir", out)
    assert result.returncode == 1 and "already exist" in result.stderr and "--overwrite" in result.stderr
    assert (out / "train.txt").read_text() == "keep me\n"
    result = run_process("--train_file", train, "--dev_file", "", "--output_dir", out, "--overwrite")
    assert result.returncode == 0 and read_jsonl(out / "train.txt")[0]["answer"] == "张三_人名"


def test_overwrite_removes_a_dev_file_the_run_does_not_produce(tmp_path):
    train = write(tmp_path / "t.json", GOOD_SPAN)
    out = tmp_path / "out"
    assert run_process("--train_file", train, "--dev_file", train, "--output_dir", out).returncode == 0
    assert (out / "dev.txt").is_file()
    # a run that fails leaves both files as they were
    bad = write(tmp_path / "bad.json", '{"text": 5, "entity_list": []}\n')
    result = run_process("--train_file", bad, "--dev_file", "", "--output_dir", out, "--overwrite")
    assert result.returncode == 1 and (out / "dev.txt").read_text(encoding="utf-8") == (out / "train.txt").read_text(encoding="utf-8")
    other = write(tmp_path / "o.json", GOOD_SPAN.replace("来了", "走了"))
    result = run_process("--train_file", other, "--dev_file", "", "--output_dir", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "dev.txt").exists() and read_jsonl(out / "train.txt")[0]["query"] == "文本：张三走了"
    # removed after the new train.txt is written, and said so
    assert f"wrote {out / 'train.txt'} (1 lines)\nremoved {out / 'dev.txt'}: left from an earlier run" in result.stdout


# str.splitlines() splits at all of these; a JSON string may hold the last three raw (json.dumps leaves them so)
SPLITLINES_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_line_break_characters_inside_json_strings(tmp_path):
    records = [{"instruction": f"说{ch}一句", "input": "", "output": f"好{ch}的"} for ch in SPLITLINES_BREAKS]
    # As other tools write them (and process.py did): \x85, U+2028, U+2029 raw; \r\n line ends; a bad last line.
    path = write(tmp_path / "in.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records) + '{"instruction"\r\n')
    bad = BadLines(skip=True)
    assert list(iter_json_lines(path, bad)) == list(enumerate(records, start=1))
    assert bad.count == 1 and bad.skipped.examples == {"not valid JSON (Expecting ':' delimiter)": [f"{path}:9"]}
    # A raw control character is invalid JSON, reported at its own line; the lines after it keep their numbers.
    raw = write(tmp_path / "raw.jsonl", '{"instruction": "a\x1cb", "output": "c"}\n' + json.dumps(records[6], ensure_ascii=False) + "\n{\n")
    bad = BadLines(skip=True)
    assert list(iter_json_lines(raw, bad)) == [(2, records[6])]
    assert [e for examples in bad.skipped.examples.values() for e in examples] == [f"{raw}:1", f"{raw}:3"]

    out = tmp_path / "out"
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", out, "--skip_bad_lines")
    assert result.returncode == 0, result.stderr
    assert "train: 8 samples" in result.stdout and f"skipped lines: 1\n    1 x not valid JSON (Expecting ':' delimiter) (at {path}:9)" in result.stdout
    # process.py's output: one line a record for any line reader (the characters escaped), read back the same
    text = (out / "train.txt").read_text(encoding="utf-8")
    assert len(text.splitlines()) == text.count("\n") == 8 and "\\u2028" in text
    expected = [{"instruct": r["instruction"], "query": "", "answer": r["output"]} for r in records]
    assert [r for _, r in iter_json_lines(out / "train.txt")] == expected

    read = read_instruction_records(out / "train.txt")
    assert [{k: r[k] for k in ("instruct", "query", "answer")} for r in read] == expected
    assert [r["line"] for r in read] == list(range(1, 9))


def test_bad_lines_are_grouped_by_kind_and_echoed_short(tmp_path):
    # 5 spans that miss their entity, 4 lines of three columns: each bad line has other content, but one reason per kind
    spans = "".join(json.dumps({"text": f"文本{i}号", "entity_list": [{"entity_index": {"begin": 0, "end": 2}, "entity_type": "PER",
                                                                     "entity": f"人{i}"}]}, ensure_ascii=False) + "\n" for i in range(5))
    path = write(tmp_path / "a.json", GOOD_SPAN + spans)
    result = run_process("--train_file", path, "--dev_file", "", "--output_dir", tmp_path / "a", "--skip_bad_lines")
    assert result.returncode == 0, result.stderr
    assert (f"skipped lines: 5\n    5 x field 'entity_list[].entity_index': span does not give the entity "
            f"(at {path}:2, {path}:3, {path}:4, ...)\ndev: none") in result.stdout
    long_line = "长" * 1_000_000
    bio = write(tmp_path / "b.txt", "张\tB-PER\n\n" + "".join(f"{c}\tO\tO\n\n" for c in "甲乙丙") + f"{long_line}\tO\tO\n")
    result = run_process("--train_file", bio, "--dev_file", "", "--output_dir", tmp_path / "b", "--skip_bad_lines")
    assert result.returncode == 0, result.stderr
    assert (f"skipped lines: 4\n    4 x field 'tag': expected 'character<TAB>tag' (at {bio}:3, {bio}:5, {bio}:7, ...)"
            in result.stdout) and len(result.stdout) < 2000
    # a bad line is echoed up to 80 characters, with its length
    result = run_process("--train_file", write(tmp_path / "c.txt", f"张\tB-PER\n\n{long_line}\tO\tO\n"), "--dev_file", "",
                         "--output_dir", tmp_path / "c")
    assert result.returncode == 1 and len(result.stderr) < 400
    assert f"got {'长' * 80!r}... (1000004 characters)" in result.stderr


ONE_LINE_ERRORS = {
    # name: (files to make {path: content}, the first one the train file; more arguments; expected message start)
    "lone_surrogate": ({"g.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "x\\ud800y"}\n'}, [],
                       "{dir}/g.jsonl:2: field 'output': lone surrogate '\\ud800' (half of a UTF-16 pair, not a character)"),
    "lone_surrogate_array": ({"c.json": '[{"text": "ab", "label": {"name": {"a\\udc00": [[0, 0]]}}}]'}, [],
                             "{dir}/c.json:record 1: field 'label.name.a\\udc00': lone surrogate '\\udc00'"),
    "deep_json_line": ({"g.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": ' + "[" * 100_000 + "\n"}, [],
                       "{dir}/g.jsonl:2: JSON nested too deeply to parse"),
    "deep_json_array": ({"g.json": "[" * 100_000}, [], "{dir}/g.json: JSON nested too deeply to parse"),
    "huge_number": ({"g.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ' + "1" * 5000 + "}\n"}, [],
                    "{dir}/g.jsonl:2: cannot read the JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    "output_dir_is_a_file": ({"t.json": GOOD_SPAN, "f": "x"}, ["--output_dir", "{dir}/f/sub"], "--output_dir: {dir}/f is a file, not a folder; choose another"),
    "train_txt_is_a_folder": ({"t.json": GOOD_SPAN, "o/train.txt/x": ""}, ["--output_dir", "{dir}/o"],
                              "{dir}/o/train.txt exists and is not a file"),
    "missing_file": ({}, ["--train_file", "{dir}/nope.json"], "{dir}/nope.json: file not found"),
    "folder_as_input": ({"d/x": ""}, ["--train_file", "{dir}/d"], "{dir}/d: is a folder, not a file"),
    "empty_file": ({"t.json": ""}, [], "{dir}/t.json: the file is empty: no records to convert"),
    "gbk": ({"t.txt": "张\tB-PER\n三\tI-PER\n".encode("gbk")}, [], "{dir}/t.txt:1: not valid UTF-8"),
    "negative_max_text_chars": ({"t.json": GOOD_SPAN}, ["--max_text_chars", "-1"], "--max_text_chars: -1 is negative; 0 (off) or more"),
    "input_format_typo": ({"t.json": GOOD_SPAN}, ["--input_format", "span-json"],
                          "--input_format: 'span-json' is no format; auto or one of bio, bio_parallel, span_json, cluener, "
                          "adgen, alpaca, conversation (did you mean span_json?)"),
}


@pytest.mark.parametrize("case", sorted(ONE_LINE_ERRORS))
def test_errors_are_one_line_and_exit_1(tmp_path, case):
    files, args, expected = ONE_LINE_ERRORS[case]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write(tmp_path / name, content)
    train = tmp_path / next(iter(files), "")
    arguments = ["--train_file", train, "--dev_file", "", "--output_dir", tmp_path / "out",
                 *(a.replace("{dir}", str(tmp_path)) for a in args)]  # a later --key wins
    result = run_process(*arguments)
    assert result.returncode == 1 and result.stderr.startswith("error: " + expected.replace("{dir}", str(tmp_path))), result.stderr
    assert result.stderr.count("\n") == 1 and "wrote" not in result.stdout
    if case == "lone_surrogate":  # --debug keeps the traceback; --skip_bad_lines skips the line
        result = run_process(*arguments, "--debug")
        assert result.returncode == 1 and "Traceback" in result.stderr and "lone surrogate" in result.stderr
        result = run_process(*arguments, "--skip_bad_lines")
        assert result.returncode == 0 and "1 x field 'output': lone surrogate (half of a UTF-16 pair)" in result.stdout
        assert read_jsonl(tmp_path / "out" / "train.txt") == [{"instruct": "a", "query": "", "answer": "b"}]


def test_a_fifo_as_input_is_named_as_such_and_never_opened(tmp_path):
    """A FIFO is neither missing nor a file: said so at once (opening it would wait for a writer forever)."""
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    result = run_process("--train_file", fifo, "--dev_file", "", "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr == f"error: {fifo}: is a FIFO (named pipe), not a regular file; give a file\n"
    with pytest.raises(DataError, match="is a FIFO"):
        read_instruction_records(fifo)
    # A symbolic link that loops is not "not found" either.
    (tmp_path / "a.json").symlink_to(tmp_path / "b.json")
    (tmp_path / "b.json").symlink_to(tmp_path / "a.json")
    result = run_process("--train_file", tmp_path / "a.json", "--dev_file", "", "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr == (f"error: {tmp_path}/a.json: is a symbolic link to {tmp_path}/b.json, "
                                                        "which does not exist or loops back\n")


def test_config_mistakes_are_refused(tmp_path):
    train = write(tmp_path / "t.json", GOOD_SPAN)
    result = run_process("--train_file", train, "--output_dir", tmp_path / "o")  # dev_file left at the demo's
    assert result.returncode == 1 and "--dev_file is still the demo's" in result.stderr
    result = run_process("--train_file", train, "--dev_file", train, "--dev_ratio", 0.1, "--output_dir", tmp_path / "o")
    assert result.returncode == 1 and "give one or the other" in result.stderr
    mixed = write(tmp_path / "g.jsonl", '{"instruction": "说", "input": "", "output": "好"}\n')
    result = run_process("--train_file", f"{train},{mixed}", "--dev_file", "", "--output_dir", tmp_path / "o")
    assert result.returncode == 1 and "mix NER and generation" in result.stderr
    assert not (tmp_path / "o").exists()
    # A mistyped option gets the near names, as in the other scripts (parse_config).
    result = run_process("--trian_file", train, "--output_dir", tmp_path / "o")
    assert result.returncode == 1 and result.stderr.startswith("error: unknown option --trian_file; did you mean --train_file")


def test_dev_ratio_split_is_deterministic(tmp_path):
    lines = "".join(json.dumps({"instruction": f"问题{i}", "input": "", "output": f"答案{i}"}, ensure_ascii=False) + "\n"
                    for i in range(20))
    train = write(tmp_path / "a.jsonl", lines)
    splits = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = run_process("--train_file", train, "--dev_file", "", "--dev_ratio", 0.25, "--seed", seed,
                             "--output_dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "dev: 5 samples split off train" in result.stdout and "train: 15 samples" in result.stdout
        split = [[r["instruct"] for r in read_jsonl(tmp_path / name / f"{s}.txt")] for s in ("train", "dev")]
        assert sorted(split[0] + split[1]) == sorted(f"问题{i}" for i in range(20))
        splits.append(split)
    assert splits[0] == splits[1] and splits[0] != splits[2]


# ---------------------------------------------------------------------------------------------------- demo data


def test_demo_data_is_reproducible(tmp_path):
    result = subprocess.run([sys.executable, str(DEMO / "make_demo_data.py"), "--out_dir", str(tmp_path / "raw")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for split in ("train", "dev"):
        assert (tmp_path / "raw" / f"{split}.json").read_bytes() == (DEMO / "raw" / f"{split}.json").read_bytes()
    result = run_process("--output_dir", tmp_path / "instruct")  # the defaults: demo raw files
    assert result.returncode == 0, result.stderr
    for split in ("train", "dev"):
        assert (tmp_path / "instruct" / f"{split}.txt").read_bytes() == (DEMO / "instruct_data" / f"{split}.txt").read_bytes()


def test_demo_data_shape():
    train = list(ner_data.read_span_json(DEMO / "raw" / "train.json"))
    dev = list(ner_data.read_span_json(DEMO / "raw" / "dev.json"))
    assert 400 <= len(train) <= 700 and 100 <= len(dev) <= 200
    assert {t for _, _, ents in train for _, t, _ in ents} == {"PER", "LOC", "ORG"}
    counts = Counter(len(ents) for _, _, ents in train)
    assert set(counts) >= {0, 1, 2, 3} and 0.1 < counts[0] / len(train) < 0.3
    seen = {e for _, _, ents in train for e, _, _ in ents}
    dev_entities = [e for _, _, ents in dev for e, _, _ in ents]
    assert sum(e not in seen for e in dev_entities) / len(dev_entities) > 0.8  # mostly unseen names
    assert not {t for _, t, _ in train} & {t for _, t, _ in dev}  # no sentence in both
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 300_000

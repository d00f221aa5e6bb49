"""predict.py, chat_ner.py, inference_test.py and the NER metrics, on an adapter trained on 16 real MSRA examples."""
import json

import pytest
import torch

from conftest import SCRIPTS, VERSIONS, run_script
from utils.config_utils import apply_overrides
from utils.data_io import write_jsonl
from utils.decode_utils import parse_ner_answer
from utils.metrics import generation_metrics, ner_metrics
from utils.prompts import source_text, user_message
from utils.records import read_instruction_records
from utils.serving import GENERATION_DEFAULTS


def test_the_generating_scripts_share_one_name_and_default_per_option(capsys):
    """predict, chat_ner, web_demo and api_server: the same generation options with the same defaults; the old names
    still work for one release, with a note."""
    import api_server
    import chat_ner
    import merge_lora_and_quantize
    import predict
    import web_demo

    shared = ("max_input_tokens", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "dtype", "device",
              "decode")
    for script in (predict, chat_ner, web_demo, api_server):
        assert {key: script.DEFAULTS[key] for key in shared} == {key: GENERATION_DEFAULTS[key] for key in shared}
    assert merge_lora_and_quantize.DEFAULTS["dtype"] == "auto"
    for script, old, new, value in ((predict, "max_source_length", "max_input_tokens", 96),
                                    (chat_ner, "max_length", "max_input_tokens", 96),
                                    (merge_lora_and_quantize, "output_path", "output_dir", "out"),
                                    (merge_lora_and_quantize, "qbits", "quant_bits", 4)):
        config = apply_overrides(script.DEFAULTS, [f"--{old}={value}"], script.RENAMED)
        assert config[new] == value and old not in config
        assert f"note: --{old} is now --{new}; the old name will be removed" in capsys.readouterr().err


def test_ner_answers_are_parsed_robustly():
    parsed = parse_ner_answer(" 张三_人名\n\n张三_人名\n- 北京_地名\n1. 中国银行_机构名\n乱写一行\n（株）_机构名\n下划线_的_名字_人名\n")
    assert parsed.entities == {("张三", "人名"), ("北京", "地名"), ("中国银行", "机构名"), ("(株)", "机构名"), ("下划线_的_名字", "人名")}
    assert parsed.malformed == ["乱写一行"]
    assert parse_ner_answer("没有").entities == set() and not parse_ner_answer("没有").malformed


def test_ner_metrics_match_a_hand_computation():
    predictions = ["张三_人名\n北京_地名\n北京_地名", "没有", "李四_人名\n上海_机构名\n胡说", "王五_人名"]
    references = ["张三_人名\n北京_地名", "华为_机构名", "李四_人名\n上海_地名", "没有"]
    metrics = ner_metrics(predictions, references)
    # Predicted {张三/人, 北京/地, 李四/人, 上海/机构, 王五/人} = 5; gold {张三/人, 北京/地, 华为/机构, 李四/人, 上海/地} = 5;
    # correct: 张三, 北京, 李四 = 3.  P = 3/5, R = 3/5, F1 = 0.6.
    assert metrics["micro"]["tp"] == 3 and metrics["micro"]["predicted"] == 5 and metrics["micro"]["gold"] == 5
    assert metrics["micro"]["f1"] == pytest.approx(0.6)
    # 人名: pred 3 (张三 李四 王五), gold 2, tp 2 -> P 2/3, R 1, F1 0.8.  机构名: pred 1, gold 1, tp 0.
    assert metrics["per_type"]["人名"]["f1"] == pytest.approx(0.8)
    assert metrics["per_type"]["机构名"]["f1"] == 0.0 and metrics["per_type"]["地名"]["recall"] == pytest.approx(0.5)
    assert metrics["malformed_lines"] == 1 and metrics["exact_match"] == pytest.approx(0.25)


def test_ner_metrics_drop_predicted_entities_that_the_text_does_not_contain():
    sources = ["文本：张三在北京工作。", "文本：华为发布新手机。", "文本：李四去了上海。", "文本：今天下雨。"]
    predictions = ["张三_人名\n北京_地名\n北京大学_机构名", "没有", "李四_人名\n上海_机构名\n胡说", "王五_人名"]
    references = ["张三_人名\n北京_地名", "华为_机构名", "李四_人名\n上海_地名", "没有"]
    metrics = ner_metrics(predictions, references, sources)
    # 北京大学 and 王五 are not in their texts: dropped. Kept: 张三, 北京, 李四, 上海/机构 = 4, of which 3 correct.
    assert metrics["not_in_text"]["dropped"] == 2
    assert (metrics["micro"]["tp"], metrics["micro"]["predicted"], metrics["micro"]["gold"]) == (3, 4, 5)
    assert metrics["per_type"]["人名"]["predicted"] == 2 and metrics["exact_match"] == pytest.approx(0.5)
    kept_with_them = metrics["not_in_text"]["micro_with_them"]
    assert (kept_with_them["tp"], kept_with_them["predicted"]) == (3, 6)
    assert kept_with_them["f1"] < metrics["micro"]["f1"]
    # Full-width text and the half-width entity a ChatGLM-6B answer has: the same after NFKC, so kept.
    assert ner_metrics(["IBM_机构名"], ["ＩＢＭ_机构名"], ["文本：ＩＢＭ公司"])["not_in_text"]["dropped"] == 0
    with pytest.raises(ValueError, match="sources"):
        ner_metrics(predictions, references, sources[:3])


def test_made_up_entities_are_checked_against_the_sentence_not_the_instruction():
    """The instruction names the types and says 实体 and 文本: predicting those is making them up, since the sentence
    does not contain them (the filter used to search the instruction and the query together)."""
    record = {"instruct": "请找出文本中的人名、地名、机构名，每行写一个'实体_类型'，如果没有就回答'没有'。",
              "query": "文本：张三在北京工作。", "answer": "张三_人名\n北京_地名"}
    assert source_text(record) == "张三在北京工作。"
    prediction = "张三_人名\n北京_地名\n人名_人名\n实体_机构名\n文本_地名\n找出_人名"
    metrics = ner_metrics([prediction], [record["answer"]], [source_text(record)])
    assert metrics["not_in_text"]["dropped"] == 4 and metrics["micro"]["precision"] == 1.0
    # A query without the prefix (a user's own data) is the sentence itself.
    assert source_text({"instruct": "", "query": "李四去了上海。"}) == "李四去了上海。"


def test_generation_metrics_use_characters():
    perfect = generation_metrics(["这件连衣裙很漂亮"], ["这件连衣裙很漂亮"])
    assert perfect["bleu-4"] == pytest.approx(100.0) and perfect["rouge1"] == pytest.approx(100.0)
    half = generation_metrics(["漂亮"], ["漂亮衣服"])
    assert half["rouge1"] == pytest.approx(100 * 2 * (1.0 * 0.5) / 1.5)  # P = 2/2, R = 2/4


def test_predict_f1_equals_the_hand_computed_value(trained_adapter, trainable_models, sixteen_examples, tmp_path):
    run_dir = trained_adapter("chatglm2-6b")
    records = read_instruction_records(sixteen_examples)
    gold_counts = [len(parse_ner_answer(r["answer"]).entities) for r in records]
    # The adapter reproduces these answers (test_training checks it). Alter three references in known ways:
    altered = [dict(r) for r in records]
    altered[0]["answer"] = "\n".join(records[0]["answer"].split("\n")[1:]) or "没有"  # one gold entity fewer: +1 FP
    altered[1]["answer"] = records[1]["answer"] + "\n不存在的实体_人名"  # one gold entity more: +1 FN
    altered[2]["answer"] = "没有"  # every predicted entity of line 2 becomes a FP
    dev_file = tmp_path / "dev.txt"
    write_jsonl(dev_file, [{k: r[k] for k in ("instruct", "query", "answer")} for r in altered])
    run_script("predict.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--lora_path={run_dir / 'adapter_model'}",
               f"--dev_file={dev_file}", f"--output_dir={tmp_path / 'out'}", "--max_new_tokens=48", "--batch_size=16", "--before_after")
    predicted = sum(gold_counts)
    true_positives = predicted - 1 - gold_counts[2]
    gold = predicted - 1 + 1 - gold_counts[2]
    precision, recall = true_positives / predicted, true_positives / gold
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["task"] == "ner"
    assert metrics["adapter"]["micro"]["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert metrics["base"]["micro"]["f1"] < metrics["adapter"]["micro"]["f1"]
    lines = (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 16 and first["prediction"] == records[0]["answer"] and first["reference"] == altered[0]["answer"]
    assert "base_prediction" in first
    # The trained answers copy their entities from the text, so scoring dropped none of them.
    assert metrics["drop_entities_not_in_text"] is True and metrics["adapter"]["not_in_text"]["dropped"] == 0
    assert all(json.loads(line)["not_in_text"] == [] for line in lines)


def test_chat_ner_answers_piped_questions_and_keeps_history(trained_adapter, trainable_models, sixteen_examples):
    run_dir = trained_adapter("chatglm2-6b")
    records = read_instruction_records(sixteen_examples)
    texts = [r["query"].removeprefix("文本：") for r in records[:2]]
    result = SCRIPTS.run(
        ["chat_ner.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--lora_path={run_dir / 'adapter_model'}",
         f"--instruct={records[0]['instruct']}"],
        input=f"{texts[0]}\n{texts[1]}\nclear\n{texts[1]}\nexit\n", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "[Round 1]" in out and "问：" in out  # the version's prompt format is shown
    answers = [block.split("\n\n用户：")[0].strip() for block in out.split("ChatGLM：")[1:]]
    assert len(answers) == 3 and "(history cleared)" in out
    assert answers[0] == records[0]["answer"]  # first turn: exactly the trained answer
    assert answers[2] == records[1]["answer"]  # after clear, the second sentence alone: its trained answer
    assert answers[1]  # second turn, with the first turn as history: answered


def test_inference_test_reports_prefill_decode_and_memory(trained_adapter, trainable_models, tmp_path):
    run_dir = trained_adapter("chatglm2-6b")
    json_path = tmp_path / "speed.json"
    result = run_script("inference_test.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--lora_path={run_dir / 'adapter_model'}",
                        "--max_new_tokens=8", "--prompt_len=24", "--batch_size=2", f"--json={json_path}")
    rows = json.loads(json_path.read_text())
    assert [r["model"] for r in rows] == ["chatglm2-6b (float32)", "chatglm2-6b (float32) + adapter"]
    for row in rows:
        assert row["batch_size"] == 2 and row["new_tokens"] == 8 and 20 <= row["prompt_len"] <= 24
        assert row["ttft_ms"] > 0 and row["decode_tokens_per_s"] > 0 and row["peak_memory_gib"] > 0
    assert "| chatglm2-6b (float32) + adapter |" in result.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_a_folded_adapter_decodes_what_the_peft_layers_decode(version, trained_adapter, trainable_models, sixteen_examples):
    """predict.py, chat_ner.py, the servers and inference_test.py fold the adapter into the weights for generation."""
    from peft import PeftModel

    from utils.dataset import PaddingCollator
    from utils.generation import generate_answers
    from utils.adapters import fold_adapter
    from utils.model_loading import load_model_and_tokenizer
    from utils.prompts import get_prompt_format

    base, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device="cpu")
    model = PeftModel.from_pretrained(base, str(trained_adapter(version) / "adapter_model")).eval()
    records = read_instruction_records(sixteen_examples)
    prompt_format = get_prompt_format(tokenizer, version)
    batch = PaddingCollator(tokenizer.pad_token_id, padding_side="left")([{"input_ids": prompt_format.prompt_ids(user_message(r), [])} for r in records])
    with torch.no_grad():
        peft_logits = model(**batch).logits
        with model.disable_adapter():
            base_answers = generate_answers(model, tokenizer, prompt_format, records, max_new_tokens=48, batch_size=16)
    peft_answers = generate_answers(model, tokenizer, prompt_format, records, max_new_tokens=48, batch_size=16)
    folded = fold_adapter(model)
    assert not [name for name, _ in folded.named_modules() if "lora" in name.lower()] and type(folded) is type(base)
    with torch.no_grad():
        real = batch["attention_mask"].bool()  # left padding: the padded positions' outputs mean nothing
        difference = (folded(**batch).logits - peft_logits)[real].abs().max().item()
    scale = peft_logits[real].abs().max().item()
    assert difference < 1e-4 * scale, (difference, scale)  # fp32 rounding: W x + B (A x) against (W + B A) x
    assert generate_answers(folded, tokenizer, prompt_format, records, max_new_tokens=48, batch_size=16) == peft_answers
    assert peft_answers != base_answers  # the adapter changes the answers, so the comparison means something

"""The small model's starting point (build_small_model.py) and plain-text (pre)training: the corpus from the real data
sets in ../shared without the MSRA test sentences, a ChatGLM2-format tokenizer that is lossless on it, a model folder
that loads like ChatGLM2-6B, TextDataset blocks that keep every token, and train_trainer.py --data_format=text
lowering the loss of a full fine-tuning on that text."""
import json
import stat

import pytest

from conftest import REPO_ROOT, SHARED, run_script
from test_training import logged_losses
from utils.data_io import DataError
from utils.dataset import TextDataset
from utils.model_loading import load_model_and_tokenizer

SMALL = ["--tokenizer_type=bpe", "--vocab_size=3000", "--tokenizer_sentences=3000", "--character_coverage=0.98", "--num_layers=2", "--hidden_size=64", "--num_attention_heads=4",
         "--ffn_hidden_size=128", "--seq_length=512"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    result = run_script("build_small_model.py", f"--shared_data_dir={SHARED / 'data'}", f"--corpus_dir={root / 'corpus'}",
                        f"--output_dir={root / 'init'}", *SMALL)
    return root, result.stdout


def corpus_texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_leaves_out_the_msra_test_set_and_the_tokenizer_is_lossless(built):
    root, stdout = built
    train, dev = corpus_texts(root / "corpus" / "train.txt"), corpus_texts(root / "corpus" / "dev.txt")
    assert len(train) > 20000 and len(dev) == round((len(train) + len(dev)) * 0.02)
    assert len(set(train + dev)) == len(train) + len(dev)
    assert f"corpus: {len(train) + len(dev)} texts" in stdout
    msra_test, sentence = set(), []
    for line in (SHARED / "data" / "msra" / "bio" / "test.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            sentence.append(line.split()[0])
        elif sentence:
            msra_test.add("".join(sentence))
            sentence = []
    assert len(msra_test) > 3000 and not msra_test & set(train + dev)

    model, tokenizer = load_model_and_tokenizer(root / "init", dtype="fp32", device="cpu")
    assert model.model_version == "chatglm2-6b"
    pieces = tokenizer.sp_model.get_piece_size()
    assert pieces == 3000 and len(tokenizer) == pieces + 5
    assert model.config.padded_vocab_size == 3008 and model.config.num_layers == 2
    assert tokenizer.get_command("[gMASK]") == pieces + 1 and tokenizer.get_command("sop") == pieces + 3
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    # Byte fallback: no text of the corpus (rare characters, newlines, spaces included) is lost.
    for text in dev + ["第一行\n第二行  两个空格 123 😀"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(tokenizer.encode("😀", add_special_tokens=False))  # as UTF-8 bytes
    mode = (root / "init" / "model.safetensors").stat().st_mode
    assert mode & stat.S_IRGRP and (root / "init").stat().st_mode & stat.S_IXOTH  # not the private mode of a temp folder


def test_char_tokenizer(built):
    """--tokenizer_type=char (the default): one piece per character (bytes for the rest), so an entity is the same
    tokens in the question and in the answer."""
    import sentencepiece as spm

    import build_small_model
    root, _ = built
    texts = corpus_texts(root / "corpus" / "train.txt")[:3000]
    config = dict(build_small_model.DEFAULTS, tokenizer_type="char", vocab_size=2000, tokenizer_sentences=0)
    sp = spm.SentencePieceProcessor(model_proto=build_small_model.train_tokenizer(texts, config))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert len(pieces) == 2000 and all(len(p) == 1 or sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)
                                       for i, p in enumerate(pieces))
    for text in texts[:200] + ["蒋玲帆傍晚从佛山回来。"]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
    assert sp.encode("据天津教育局介绍", out_type=str) == ["▁", *"据天津教育局介绍"]


def test_text_dataset_keeps_every_token_and_reports_bad_lines(built, tmp_path):
    root, _ = built
    _, tokenizer = load_model_and_tokenizer(root / "init", dtype="fp32", device="cpu")
    texts = corpus_texts(root / "corpus" / "dev.txt")[:40]
    data = TextDataset(root / "corpus" / "dev.txt", tokenizer, block_size=64)
    stream = [t for text in corpus_texts(root / "corpus" / "dev.txt") for t in tokenizer.encode(text, add_special_tokens=False) + [2]]
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert all(e["input_ids"][:2] == prefix and e["labels"][:2] == [-100, -100] for e in data)
    assert all(len(e["input_ids"]) == 64 for e in list(data)[:-1]) and 2 < len(data[-1]["input_ids"]) <= 64
    assert [t for e in data for t in e["labels"][2:]] == stream == [t for e in data for t in e["input_ids"][2:]]
    assert data.stats["text_tokens"] == len(stream) and data.stats["records"] == len(corpus_texts(root / "corpus" / "dev.txt"))

    bad = tmp_path / "bad.txt"
    bad.write_text(json.dumps({"text": texts[0]}, ensure_ascii=False) + "\n" + json.dumps({"txt": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.txt:2: field 'text': missing"):
        TextDataset(bad, tokenizer, block_size=64)
    skipped = TextDataset(bad, tokenizer, block_size=64, skip_bad_lines=True)
    assert skipped.stats["skipped_lines"] == 1 and skipped.stats["records"] == 1


def test_train_trainer_trains_on_plain_text(built, tmp_path):
    root, _ = built
    run_dir = tmp_path / "run"
    corpus = root / "corpus" / "dev.txt"
    result = run_script("train_trainer.py", f"--model_dir={root / 'init'}", f"--train_file={corpus}", f"--dev_file={corpus}",
                        "--data_format=text", "--block_size=128", "--method=full", "--max_steps=20", "--save_steps=20",
                        "--eval_steps=20", "--learning_rate=1e-2", "--warmup_steps=2", "--per_device_train_batch_size=16",
                        "--logging_steps=1", f"--output_dir={run_dir}", "--report_to=none")
    assert "texts," in result.stdout and "blocks" in result.stdout
    losses = logged_losses(run_dir, 20)
    assert losses[20] < losses[1] - 0.8, losses  # from guessing uniformly (ln 3005 = 8.0) towards the text statistics
    train_args = json.loads((run_dir / "model" / "train_args.json").read_text())
    assert train_args["config"]["data_format"] == "text" and train_args["data"]["train"]["text_tokens"] > 10000
    # The pretrained folder loads as a base model for the next step (LoRA tuning, predict.py).
    model, _ = load_model_and_tokenizer(run_dir / "model", dtype="fp32", device="cpu")
    assert model.config.num_layers == 2


SHIPPED = REPO_ROOT / "model_hub" / "chatglm2-small"


def test_shipped_model_is_small_and_loads_as_chatglm2():
    assert (SHIPPED / "model.safetensors").stat().st_size <= 20 * 10**6
    model, tokenizer = load_model_and_tokenizer(SHIPPED)
    assert model.model_version == "chatglm2-6b"
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 20e6
    text = "中国人民银行在北京召开会议。"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_a_short_lora_run_on_the_shipped_model_raises_f1_on_a_fixed_ner_set(sixteen_examples, tmp_path):
    """The scripts' defaults (the shipped model, its LoRA recipe): 20 steps on 16 real MSRA sentences (16 already
    reach F1 1.0), then predict.py --before_after on the same 16. Untuned, the model writes no well-formed entity line."""
    run_dir = tmp_path / "run"
    run_script("train_trainer.py", f"--train_file={sixteen_examples}", f"--dev_file={sixteen_examples}",
               f"--output_dir={run_dir}", "--max_steps=20", "--save_steps=0", "--eval_steps=20", "--report_to=none")
    assert json.loads((run_dir / "adapter_model" / "adapter_config.json").read_text())["r"] == 32
    run_script("predict.py", f"--lora_path={run_dir / 'adapter_model'}", f"--dev_file={sixteen_examples}", "--before_after")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model_dir"] == "model_hub/chatglm2-small"
    before, after = metrics["base"]["micro"]["f1"], metrics["adapter"]["micro"]["f1"]
    assert before < 0.1 and after >= before + 0.5, (before, after)

"""Make what the project's small ChatGLM2-architecture model starts from: a Chinese pretraining corpus, a SentencePiece
tokenizer trained on it in the ChatGLM2 format, and a model folder with random weights; pretraining is then full
fine-tuning on plain text (model_hub/chatglm2-small/README.md has the whole recipe and its figures):

    python build_small_model.py            # data/pretrain_zh/text_data/{train,dev}.txt and model_hub/chatglm2-small-init/
    python train_trainer.py --model_dir=model_hub/chatglm2-small-init --data_name=pretrain_zh --data_format=text \
        --method=full --block_size=512 ...

Corpus: the Chinese text of the data sets in --shared_data_dir, deduplicated, shuffled with --seed and split into
train and dev; MSRA test sentences are left out wherever they occur, so the test figures stay clean. Tokenizer:
ChatGLM2's SentencePiece settings, then its five specials. Model: the ChatGLM2 network at the sizes below.
"""
import io
import json
import random
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from utils.config_utils import ConfigError, parse_config
from utils.data_io import BadLines, iter_json_records, read_text, write_jsonl
from utils.model_folder import folder_config, write_model_folder
from utils.model_loading import remote_module
from utils.ner_data import read_bio
from utils.run_dirs import staged_folder

DEFAULTS = {
    "shared_data_dir": "../shared/data",
    "corpus_dir": "data/pretrain_zh/text_data",  # {train,dev}.txt of {"text"} records are written here
    "output_dir": "model_hub/chatglm2-small-init",  # the model folder with random weights (must not exist)
    "dev_fraction": 0.02,
    "seed": 0,
    "tokenizer_type": "char",  # "char": one piece per character, so an entity in the answer is the same tokens as in
    # the question, which a small model copies far more easily (MSRA F1 0.437 against 0.391 with "bpe" pieces)
    "vocab_size": 5000,  # at most this many sentencepiece pieces (char: 4,532 characters and bytes reach the coverage);
    # the five GLM specials come after them
    "tokenizer_sentences": 0,  # > 0: train the tokenizer on this many sampled texts (faster, for tests)
    "character_coverage": 0.9995,  # characters rarer than this share get no piece of their own (bytes instead)
    "num_layers": 6,
    "hidden_size": 256,
    "num_attention_heads": 8,
    "multi_query_group_num": 2,  # key/value heads, as ChatGLM2-6B's grouped-query attention
    "ffn_hidden_size": 704,
    "seq_length": 2048,
    "dropout": 0.1,  # hidden and attention dropout: the corpus (about 1 M tokens) is read for many epochs
}
GLM_SPECIALS = 5  # [MASK] [gMASK] [sMASK] sop eop, appended by tokenization_chatglm.py


# ---- the corpus: one reader per format of ../shared/data -----------------------------------------------------------

def json_lines(path):
    """The records of a JSON-lines or JSON array file."""
    return [record for _, record in iter_json_records(path)]


def tagged_sentences(path):
    """The sentences of a one-character-a-line tagged file, read as process.py reads them; those with broken tags are
    left out and counted (Resume's train file has one)."""
    bad_lines = BadLines(skip=True)
    sentences = [text for _, text, _ in read_bio(path, bad_lines)]
    if bad_lines.count:
        print(bad_lines.summary())
    return sentences


def read_sources(data_dir):
    """{set name: [text, ...]} of every pretraining source, and the MSRA test sentences (to leave out)."""
    data_dir = Path(data_dir)
    sources = {
        "msra_val": [line.replace(" ", "") for line in read_text(data_dir / "msra/bio/val_sentences.txt").splitlines() if line.strip()],
        "msra_1000": [record["text"] for record in json_lines(data_dir / "msra/ori_data/msra_1000.txt")],
        "msra_instruct": [record["query"].removeprefix("文本：") for record in json_lines(data_dir / "msra/instruct_data/dev.txt")],
        "cluener": [record["text"] for name in ("train.json", "dev.json") for record in json_lines(data_dir / "cluener" / name)],
        "peoples_daily": tagged_sentences(data_dir / "peoples_daily/example.dev"),
        "weibo": [s for name in ("weiboNER_2nd_conll.train", "weiboNER_2nd_conll.dev")
                  if (data_dir / "weibo_ner" / name).is_file()
                  for s in tagged_sentences(data_dir / "weibo_ner" / name)],
        "resume": [s for name in ("train.char.bmes", "dev.char.bmes") for s in tagged_sentences(data_dir / "resume_ner" / name)],
        "adgen": [record["summary"] for record in json_lines(data_dir / "adgen/dev_content_summary.json")],
        "alpaca_zh": [
            "\n".join(part for part in (record["instruction"], record.get("input", ""), record["output"]) if part)
            for name in ("alpaca_zh_demo_llamafactory.json", "alpaca_chinese_dataset_part00_first1000.json")
            for record in json_lines(data_dir / "alpaca_zh" / name)
        ],
    }
    if not sources["weibo"]:
        raise FileNotFoundError(f"{data_dir / 'weibo_ner'}: no weiboNER_2nd_conll.train or .dev")
    msra_test = set(tagged_sentences(data_dir / "msra/bio/test.txt"))
    return sources, msra_test


def test_sentence_index(msra_test, min_length=10):
    """MSRA test sentences of at least min_length characters by their first two characters, so that finding one
    inside a text costs a few dictionary lookups rather than a scan of all 3,442."""
    index = {}
    for sentence in msra_test:
        if len(sentence) >= min_length:
            index.setdefault(sentence[:2], []).append(sentence)
    return index


def contains_test_sentence(text, index):
    return any(sentence in text[i:] for i in range(len(text) - 1) for sentence in index.get(text[i:i + 2], ()))


def build_corpus(config):
    sources, msra_test = read_sources(config["shared_data_dir"])
    index = test_sentence_index(msra_test)
    seen, texts, counts, left_out = set(), [], {}, 0
    for name, items in sources.items():
        kept = 0
        for text in items:
            text = text.strip()
            if not text or text in seen:
                continue
            seen.add(text)
            if text in msra_test or contains_test_sentence(text, index):  # e.g. People's Daily holds MSRA's sentences
                left_out += 1
                continue
            texts.append(text)
            kept += 1
        counts[name] = kept
    random.Random(config["seed"]).shuffle(texts)
    dev_count = max(1, round(len(texts) * config["dev_fraction"]))
    corpus_dir = Path(config["corpus_dir"])
    write_jsonl(corpus_dir / "train.txt", [{"text": t} for t in texts[dev_count:]])
    write_jsonl(corpus_dir / "dev.txt", [{"text": t} for t in texts[:dev_count]])
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts)):,} characters ({dev_count} texts for dev) in {corpus_dir}; "
          f"{left_out} left out for holding an MSRA test sentence; per set: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    return texts


# ---- the tokenizer and the model folder ----------------------------------------------------------------------------

def train_tokenizer(texts, config):
    """A sentencepiece model (bytes) with ChatGLM2's settings."""
    if config["tokenizer_sentences"] > 0:
        texts = random.Random(config["seed"]).sample(texts, min(len(texts), config["tokenizer_sentences"]))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=config["vocab_size"], model_type=config["tokenizer_type"],
        character_coverage=config["character_coverage"], byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384, num_threads=2, minloglevel=2,
    )
    return model.getvalue()


def model_config(config, pieces):
    """config.json of the small model: ChatGLM2-6B's fields, the sizes of `config`."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    return {
        "_name_or_path": "chatglm2-small", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": config["dropout"], "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True, "ffn_hidden_size": config["ffn_hidden_size"], "fp32_residual_connection": False,
        "hidden_dropout": config["dropout"], "hidden_size": hidden, "kv_channels": hidden // heads, "layernorm_epsilon": 1e-5,
        "multi_query_attention": True, "multi_query_group_num": config["multi_query_group_num"], "num_attention_heads": heads,
        "num_layers": config["num_layers"], "original_rope": True, "padded_vocab_size": -(-(pieces + GLM_SPECIALS) // 64) * 64,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": config["seq_length"], "use_cache": True,
        "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
    }


def main(config):
    output_dir = Path(config["output_dir"])
    if config["tokenizer_type"] not in ("bpe", "char"):
        raise ConfigError(f"--tokenizer_type={config['tokenizer_type']}: expected bpe or char")
    if output_dir.exists():
        raise ConfigError(f"--output_dir={output_dir}: already exists; remove it or choose another --output_dir")
    texts = build_corpus(config)
    tokenizer_model = train_tokenizer(texts, config)
    pieces = spm.SentencePieceProcessor(model_proto=tokenizer_model).get_piece_size()
    config_dict = model_config(config, pieces)
    torch.manual_seed(config["seed"])
    model = remote_module("chatglm2-6b", "modeling_chatglm").ChatGLMForConditionalGeneration(
        remote_module("chatglm2-6b", "configuration_chatglm").ChatGLMConfig(**config_dict))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as source, staged_folder(output_dir) as staging:
        (Path(source) / "tokenizer.model").write_bytes(tokenizer_model)
        (Path(source) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False}, indent=2), encoding="utf-8")
        write_model_folder(staging, state, folder_config(config_dict, "chatglm2-6b", torch.float32), "chatglm2-6b", source,
                           max_shard_bytes=2 * 10**9)
    parameters = sum(t.numel() for t in state.values())
    print(f"tokenizer: {pieces} pieces + {GLM_SPECIALS} specials; model: {parameters / 1e6:.2f}M parameters "
          f"({config_dict['num_layers']} layers, hidden {config_dict['hidden_size']}), random weights in {output_dir}")
    return output_dir


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))

"""Models that transformers supports natively (here a tiny Llama with a tokenizer trained on the demo data): prompts
come from the tokenizer's chat template, whose own turn-closing token ends the answer. (The scripts' runs on such a
model: tests/test_glm4.py.)"""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import REPO_ROOT
from utils.dataset import InstructionDataset
from utils.model_loading import load_model_and_tokenizer
from utils.records import read_instruction_records

DEMO_TRAIN = REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "train.txt"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    records = read_instruction_records(DEMO_TRAIN)
    texts = [r["instruct"] + r["query"] + r["answer"] for r in records]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one piece per character to start from
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("llama")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_chat_template_prompts_and_labels(tiny_llama):
    model, tokenizer = load_model_and_tokenizer(tiny_llama, dtype="fp32", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.model_version is None
    data = InstructionDataset(DEMO_TRAIN, tokenizer, None, max_source_length=256, max_target_length=64)
    record = read_instruction_records(DEMO_TRAIN)[0]
    example = data[0]
    first_label = next(i for i, label in enumerate(example["labels"]) if label != -100)
    prompt = tokenizer.decode(example["input_ids"][:first_label])
    assert prompt.replace(" ", "") == f"<|user|>{record['instruct']}\n{record['query']}</s><|assistant|>".replace(" ", "")
    target = tokenizer.decode([label for label in example["labels"] if label != -100])
    assert target.replace(" ", "") == (record["answer"] + "</s>").replace(" ", "")  # the turn ends the template's way

"""Model folders read straight to the device (utils/model_loading.py): the model of each kind of folder computes the
logits of transformers' own from_pretrained of the folder; a legacy .bin is read with weights_only."""
import argparse
import json

import pytest
import torch

from conftest import REPO_ROOT, TOKENIZERS
from utils.model_folder import folder_config, unique_state_dict, write_model_folder
from utils.model_loading import ModelFolderError, load_model_and_tokenizer, read_config, remote_module

TEXT = "文本：中国人民银行在北京召开会议。"


def from_pretrained_of_the_folder(model_dir, dtype):
    """The model as loaded before: transformers' from_pretrained of the folder path."""
    config = read_config(model_dir)
    if config.get("model_type") == "chatglm":
        version = load_model_and_tokenizer.__globals__["detect_model_version"](config)
        model_class = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration
        config = remote_module(version, "configuration_chatglm").ChatGLMConfig.from_pretrained(str(model_dir))
        return model_class.from_pretrained(str(model_dir), config=config, dtype=dtype).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def assert_same_logits(model_dir, dtype=torch.float32, capsys=None):
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=dtype, device="cpu")
    reference = from_pretrained_of_the_folder(model_dir, dtype)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.name_or_path == reference.name_or_path == str(model_dir)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == expected[k].dtype and torch.equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("version", ["chatglm-6b", "chatglm2-6b"])
def test_base_folders_load_as_from_pretrained_loads_them(version, tiny_model_dirs, capsys):
    assert_same_logits(tiny_model_dirs[version])
    assert f"{tiny_model_dirs[version]}: loaded onto cpu in " in capsys.readouterr().out
    assert_same_logits(tiny_model_dirs[version], torch.bfloat16)  # cast as it is read


@pytest.mark.parametrize("kind", ["sharded", "int8", "int4"])
def test_merged_and_quantized_folders_load_as_from_pretrained_loads_them(kind, tiny_model_dirs, tmp_path):
    base = tiny_model_dirs["chatglm2-6b"]
    bits, dtype = {"sharded": (0, torch.float32), "int8": (8, torch.float32), "int4": (4, torch.float16)}[kind]
    model, _ = load_model_and_tokenizer(base, dtype=dtype, device="cpu")
    if bits:
        model.quantize(bits)
    folder = tmp_path / kind
    folder.mkdir()
    config = folder_config(read_config(base), "chatglm2-6b", dtype, bits, model.config.output_layer_quantization_bit)
    files = write_model_folder(folder, unique_state_dict(model), config, "chatglm2-6b", base, 100_000)
    assert len(files) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert_same_logits(folder, dtype)


@pytest.mark.parametrize("layout", ["glm", "glm4"])
def test_glm4_folders_load_as_from_pretrained_loads_them(layout, tmp_path):
    from tools.tiny_models import make_tiny_glm4

    folder = make_tiny_glm4(tmp_path / layout, [TEXT, "没有"], model_type=layout)
    assert_same_logits(folder)
    model, _ = load_model_and_tokenizer(folder, dtype="fp32", device="cpu")
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert model.generation_config.eos_token_id == stops


def test_legacy_bin_folders_load_and_only_tensors_are_unpickled(tmp_path):
    from tools.tiny_models import make_tiny_model

    folder = make_tiny_model("chatglm2-6b", tmp_path / "bin", TOKENIZERS / "chatglm2-6b", weights_format="bin")
    assert_same_logits(folder)
    shard = folder / "pytorch_model-00001-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), "extra": argparse.Namespace(code="not a tensor")}, shard)
    with pytest.raises(ModelFolderError, match="pytorch_model-00001-of-00002.bin: holds more than tensors"):
        load_model_and_tokenizer(folder, dtype="fp32", device="cpu")

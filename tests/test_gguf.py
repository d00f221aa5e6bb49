"""merge_lora_and_quantize.py --gguf: the GGUF files run in llama.cpp (through llama-cpp-python) as our models do. The
shipped small model (ChatGLM2), a tiny ChatGLM3 and a tiny GLM-4 of each transformers layout (GlmForCausalLM,
Glm4ForCausalLM), each after a LoRA run: llama.cpp tokenizes as our tokenizer does, continues an MSRA prompt
greedily as our model does (f16: all 16 tokens; q8_0: our token at 12 or more of the 16 steps; q4_0: it loads and
answers), its chat completion builds our prompt ids, and the merged folder alone (--lora_path=none) gives the same
tensors; what llama.cpp cannot take is refused in one line. Ollama itself is not run: its Modelfile is checked
against the GGUF's vocabulary only. Two to three minutes on 2 CPU cores (most of it the four LoRA runs)."""
import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import merge_lora_and_quantize as merge_script
import utils.gguf_export as gguf_export
from conftest import OVERFIT, REPO_ROOT, SHARED, run_script
from tools.tiny_models import make_tiny_glm4
from utils.chat_data import TOOL_SYSTEM_PROMPT
from utils.model_loading import load_model_and_tokenizer
from utils.prompts import get_prompt_format, user_message

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (requirements.txt, tests)")

SMALL_MODEL = REPO_ROOT / "model_hub" / "chatglm2-small"
MSRA_DEV = SHARED / "data" / "msra" / "instruct_data" / "dev.txt"
TEXTS = {
    "chinese": "因有关日寇在京掠夺文物详情，藏于中国国家图书馆。",
    "english": "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "mixed": "张三在Google北京工作，email: zhang@example.com，电话 138-0000-0000。\n  两个空格\t和制表符",
}
NEW_TOKENS = 16
TYPES = ("f16", "q8_0", "q4_0")
TWO_TURNS = [("你好", "你好！我是一个实体识别模型。")]
SECOND_QUESTION = "找出句子中的人名：张三去了上海。"
TOOLS = [{"name": "get_weather", "description": "查询一个城市今天的天气",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
TOOL_CHAT = [
    {"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": TOOLS},
    {"role": "user", "content": "北京今天天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
    {"role": "observation", "content": json.dumps({"city": "北京", "weather": "晴", "temperature": 25},
                                                  ensure_ascii=False)},
    {"role": "assistant", "content": "北京今天晴，气温25度。"},
    {"role": "user", "content": "那上海呢？"},
]


def msra_records(count):
    return [json.loads(line) for line in MSRA_DEV.read_text(encoding="utf-8").splitlines()[:count]]


def long_answer_records():
    """The 8 shortest MSRA dev records with four or more entities: answers of 16 to 22 tokens, so that a model that
    learned them continues their prompts decisively for 16 tokens (a random model's near-ties flip on rounding)."""
    lines = sorted(MSRA_DEV.read_text(encoding="utf-8").splitlines(), key=len)
    return [json.loads(line) for line in lines if json.loads(line)["answer"].count("\n") >= 3][:8]


def lora_run(model_dir, root, steps):
    """train_trainer.py's LoRA on every linear layer on the long-answer records (a random tiny model needs about 40
    steps to learn them; the shipped small model, pretrained, continues them decisively after a few)."""
    train = root / "train.txt"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in long_answer_records()), encoding="utf-8")
    run_script("train_trainer.py", f"--model_dir={model_dir}", f"--train_file={train}", "--dev_file=none",
               f"--output_dir={root / 'run'}", f"--max_steps={steps}", "--save_steps=100", *OVERFIT)
    return root / "run" / "adapter_model"


def export(output_dir, gguf_type, lora_path="none", model_dir=""):
    """The script's main() with --gguf; the folder keeps fp32 so that ours is the exact merged model."""
    config = dict(merge_script.DEFAULTS, lora_path=str(lora_path), model_dir=str(model_dir), output_dir=str(output_dir),
                  gguf=gguf_type, dtype="fp32")
    folder = merge_script.main(config)
    return folder / f"{folder.name}-{gguf_type}.gguf"


def exported_set(root, lora_path="none", model_dir=""):
    """One model exported as every type: {"files": {type: gguf path}, "vocab": {type: llama_cpp.Llama with the
    vocabulary only}, "f16": llama_cpp.Llama of the f16 file}, and our model and tokenizer from the merged folder."""
    files = {gguf_type: export(root / gguf_type, gguf_type, lora_path, model_dir) for gguf_type in TYPES}
    model, tokenizer = load_model_and_tokenizer(files["f16"].parent, dtype="fp32", device="cpu")
    vocab = {gguf_type: llama_cpp.Llama(str(path), vocab_only=True, verbose=False) for gguf_type, path in files.items()}
    f16 = llama_cpp.Llama(str(files["f16"]), n_ctx=1024, n_threads=2, seed=0, verbose=False)
    return {"files": files, "vocab": vocab, "f16": f16, "model": model, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The shipped small model (ChatGLM2) with a LoRA run, exported as f16, q8_0 and q4_0."""
    root = tmp_path_factory.mktemp("gguf-small")
    return exported_set(root, lora_path=lora_run(SMALL_MODEL, root, steps=3)) | {"version": "chatglm2-6b"}


@pytest.fixture(scope="module")
def chatglm3(trainable_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-chatglm3")
    adapter = lora_run(trainable_models["chatglm3-6b"], root, 40)
    return exported_set(root, lora_path=adapter) | {"version": "chatglm3-6b"}


@pytest.fixture(scope="module")
def glm_exports(tmp_path_factory):
    """Tiny GLM-4s with a LoRA run, by layout: glm-4-9b-chat-hf's ("glm"), GLM-4-0414's ("glm4")."""
    made = {}

    def export_layout(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"gguf-{kind}")
            texts = [f"{user_message(r)}\n{r['answer']}" for r in msra_records(300)] + list(TEXTS.values())
            model_dir = make_tiny_glm4(root / "model", texts, model_type=kind)
            adapter = lora_run(model_dir, root, 40)
            made[kind] = exported_set(root, lora_path=adapter, model_dir=model_dir) | {"version": None}
        return made[kind]

    return export_layout


@pytest.fixture(scope="module", params=["small", "chatglm3", "glm", "glm4"])
def exported(request):
    if request.param.startswith("chatglm") or request.param == "small":
        return request.getfixturevalue(request.param)
    return request.getfixturevalue("glm_exports")(request.param)


@torch.no_grad()
def greedy_ours(model, prompt, count):
    """`count` greedy tokens of our model (no stop token: llama.cpp's side does not stop either)."""
    ids = list(prompt)
    for _ in range(count):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def greedy_llama(llm, prompt, count):
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == count:
            return tokens


def quantized_choices(path, prompt, continuation):
    """llama.cpp's greedy token of a quantized file after the prompt and after each prefix of `continuation` (ours:
    teacher forcing, so that one early flip does not decide the rest), through llama.cpp's C API with the weights
    loaded as written (llama-cli --no-repack): llama-cpp-python's Llama always repacks them, and the AMX kernels that
    then run q8_0/q4_0 on AMX CPUs fault in some VMs (ldtilecfg, SIGSEGV, seen on the Firecracker test machine)."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx, context_params.n_threads, context_params.n_threads_batch = 1024, 2, 2
    context = llama_cpp.llama_init_from_model(model, context_params)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    try:
        choices, batch_ids = [], (llama_cpp.llama_token * len(prompt))(*prompt)
        for token in continuation:
            assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(batch_ids, len(batch_ids))) == 0
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, -1), shape=(n_vocab,))
            choices.append(int(logits.argmax()))
            batch_ids = (llama_cpp.llama_token * 1)(token)
        return choices
    finally:
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)


def msra_prompt(exported):
    prompt_format = get_prompt_format(exported["tokenizer"], exported["version"])
    return prompt_format.prompt_ids(user_message(long_answer_records()[0]), [])


def test_llama_cpp_tokenizes_as_ours(exported):
    tokenizer = exported["tokenizer"]
    for gguf_type, llm in exported["vocab"].items():
        for kind, text in TEXTS.items():
            ours = tokenizer.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ours, (gguf_type, kind)


def test_greedy_continuation_of_an_msra_prompt(exported):
    """f16 continues exactly as ours; q8_0 picks our token at 12 or more of the 16 steps; q4_0 loads and answers."""
    prompt = msra_prompt(exported)
    ours = greedy_ours(exported["model"], prompt, NEW_TOKENS)
    assert greedy_llama(exported["f16"], prompt, NEW_TOKENS) == ours
    q8_0 = quantized_choices(exported["files"]["q8_0"], prompt, ours)
    assert sum(a == b for a, b in zip(q8_0, ours)) >= 12, (q8_0, ours)
    q4_0 = quantized_choices(exported["files"]["q4_0"], prompt, ours)
    assert len(q4_0) == NEW_TOKENS and exported["tokenizer"].decode(q4_0).strip(), q4_0


def llama_chat_prompt_ids(llm, messages):
    """The ids llama-cpp-python's chat completion (the GGUF's chat template) puts before the answer: what the
    context holds after one generated token, which is sampled but not evaluated."""
    llm.reset()
    llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    return llm.input_ids[:llm.n_tokens].tolist()


def test_chat_completion_builds_our_prompt_ids(exported):
    """A two-turn conversation, with a system message and without, through every file's chat template."""
    prompt_format = get_prompt_format(exported["tokenizer"], exported["version"])
    for system in ("", "你是一个实体识别模型。"):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": text} for turn in TWO_TURNS for role, text in zip(("user", "assistant"), turn)]
        messages.append({"role": "user", "content": SECOND_QUESTION})
        ours = prompt_format.prompt_ids(SECOND_QUESTION, TWO_TURNS, system)
        assert llama_chat_prompt_ids(exported["f16"], messages) == ours, system


def test_chatglm3_chat_with_a_tool_call(chatglm3):
    tokenizer = chatglm3["tokenizer"]
    ours = tokenizer.build_chat_input(TOOL_CHAT[-1]["content"], history=TOOL_CHAT[:-1])["input_ids"][0].tolist()
    assert llama_chat_prompt_ids(chatglm3["f16"], TOOL_CHAT) == ours
    # OpenAI's name of a tool's result is ChatGLM3's observation.
    renamed = [{**message, "role": "tool"} if message["role"] == "observation" else message for message in TOOL_CHAT]
    assert llama_chat_prompt_ids(chatglm3["f16"], renamed) == ours


def test_modelfile_names_the_file_and_stops_on_special_tokens(exported):
    for gguf_type, path in exported["files"].items():
        lines = (path.parent / "Modelfile").read_text(encoding="utf-8").splitlines()
        assert f"FROM ./{path.name}" in lines and any(line.startswith('TEMPLATE """[gMASK]') for line in lines)
        stops = [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("PARAMETER stop ")]
        assert stops, lines
        llm = exported["vocab"][gguf_type]
        for stop in stops:  # each one token of the vocabulary that ends generation
            tokens = llm.tokenize(stop.encode("utf-8"), add_bos=False, special=True)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            assert len(tokens) == 1 and llama_cpp.llama_vocab_is_eog(vocab, tokens[0]), stop


def gguf_tensors(path):
    """name -> (GGUF type, shape, bytes) of a GGUF file's tensors."""
    return {t.name: (t.tensor_type, tuple(t.shape), t.data.tobytes()) for t in GGUFReader(path).tensors}


def test_a_model_folder_alone_gives_the_same_file(exported, tmp_path):
    """--lora_path=none on the merged folder: the same tensors as from the base and its adapter (the names of the
    folders, written into the file, differ)."""
    for gguf_type in ("f16", "q4_0"):
        from_adapter = exported["files"][gguf_type]
        alone = export(tmp_path / gguf_type, gguf_type, model_dir=exported["files"]["f16"].parent)
        assert gguf_tensors(alone) == gguf_tensors(from_adapter)


def refused(*args):
    """A refused merge_lora_and_quantize.py run: (its one error line, whether it left anything in the output)."""
    result = run_script("merge_lora_and_quantize.py", *args, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()


def test_what_llama_cpp_cannot_run_is_refused_in_one_line(trainable_models, small, tmp_path):
    target = tmp_path / "out"
    v1 = refused("--lora_path=none", f"--model_dir={trainable_models['chatglm-6b']}", f"--output_dir={target}",
                 "--gguf=f16")
    assert v1 == ["error: --gguf: ChatGLM-6B (v1) has no llama.cpp architecture (llama.cpp runs ChatGLM2-6B, "
                  "ChatGLM3-6B and GLM-4); it cannot be written as a GGUF"]
    bad_type = refused("--lora_path=none", f"--model_dir={SMALL_MODEL}", f"--output_dir={target}", "--gguf=q4_k_m")
    assert bad_type == ["error: --gguf='q4_k_m': expected one of f16, q8_0, q4_0 (gguf-py cannot write k-quants such "
                        "as q4_k_m; llama.cpp's llama-quantize makes them from the f16 file)"]
    # Our int8 folder: the GGUF is made from float weights (q8_0 is llama.cpp's own 8 bits).
    int8 = merge_script.main(dict(merge_script.DEFAULTS, lora_path="none", model_dir=str(SMALL_MODEL),
                                  output_dir=str(tmp_path / "int8"), quant_bits=8))
    quantized = refused("--lora_path=none", f"--model_dir={int8}", f"--output_dir={target}", "--gguf=q8_0")
    assert len(quantized) == 1 and "is quantized (quantization_bit=8)" in quantized[0]
    assert not target.exists()


def test_p_tuning_prefix_is_refused(trainable_models, tmp_path):
    run_dir = tmp_path / "ptuning"
    run_script("train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--output_dir={run_dir}",
               "--method=ptuning", "--pre_seq_len=4", "--max_steps=1", "--save_steps=100", "--dev_file=none",
               "--report_to=none")
    lines = refused(f"--lora_path={run_dir / 'prefix_model'}", f"--output_dir={tmp_path / 'out'}", "--gguf=f16")
    assert len(lines) == 1 and "is a P-tuning v2 prefix" in lines[0] and "llama.cpp has no place for" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_failed_gguf_write_leaves_nothing(small, tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "encode_tensor", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path / "out", "f16", model_dir=small["files"]["f16"].parent)
    assert list(tmp_path.iterdir()) == []

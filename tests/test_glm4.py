"""GLM-4 through transformers' own classes (GlmForCausalLM: glm-4-9b-chat-hf; Glm4ForCausalLM: GLM-4-0414), on tiny
models with a byte-level tokenizer trained here with GLM-4's special tokens and chat template (tools/tiny_models.py):
prompts and labels as GLM-4's own finetuning lays them out, then LoRA, full and QLoRA training, predict, chat, merge
and the API server on them."""
import asyncio
import copy
import json
import logging

import httpx
import pytest
import torch

from conftest import REPO_ROOT, SCRIPTS, run_script
from test_fast_decode import assert_within_rounding, decode
from test_training import logged_losses
from tools.tiny_models import make_tiny_glm4
from utils.dataset import encode_example
from utils.decode_engine import GlmRows, NativeCompiler, NativeSteps, StepRunner, rows_class
from utils.generation import generate_answers, stream_chat_reply
from utils.adapters import load_model_with_adapter
from utils.model_loading import load_model_and_tokenizer
from utils.prompts import get_prompt_format, user_message
from utils.records import read_instruction_records

DEMO_TRAIN = REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "train.txt"
DEMO_DEV = REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "dev.txt"


@pytest.fixture(scope="module")
def glm4_dirs(tmp_path_factory):
    """{"glm": glm-4-9b-chat-hf layout, "glm4": GLM-4-0414 layout}, tiny, tokenizers trained on the demo data."""
    texts = [f"{user_message(r)}\n{r['answer']}" for r in read_instruction_records(DEMO_TRAIN)]
    return {kind: make_tiny_glm4(tmp_path_factory.mktemp(kind) / "model", texts, model_type=kind) for kind in ("glm", "glm4")}


@pytest.fixture(scope="module")
def lora_run(glm4_dirs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("glm4_lora") / "run"
    run_script("train_trainer.py", f"--model_dir={glm4_dirs['glm']}", f"--output_dir={run_dir}", "--max_steps=30",
               "--per_device_train_batch_size=16", "--learning_rate=1e-2", "--lora_r=16", "--lora_alpha=32",
               "--warmup_steps=0", "--save_steps=30", "--eval_steps=30", "--logging_steps=5", "--report_to=none")
    return run_dir


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_prompt_labels_and_stop_tokens_are_glm4s(kind, glm4_dirs):
    model, tokenizer = load_model_and_tokenizer(glm4_dirs[kind], dtype="fp32", device="cpu")
    assert type(model).__name__ == {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}[kind] and model.model_version is None
    prompt_format = get_prompt_format(tokenizer, None)
    record = read_instruction_records(DEMO_TRAIN)[0]
    example, _, _ = encode_example(record, prompt_format, 256, 64)
    # GLM-4's finetuning: every message after [gMASK]<sop> as the template renders it, then <|user|> ends the
    # answer; the loss covers what follows <|assistant|>: "\n", the answer and that <|user|>.
    prompt = f"[gMASK]<sop><|user|>\n{user_message(record)}<|assistant|>"
    target = f"\n{record['answer']}<|user|>"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert example["input_ids"] == prompt_ids + tokenizer.encode(target, add_special_tokens=False)
    assert example["labels"] == [-100] * len(prompt_ids) + example["input_ids"][len(prompt_ids):]
    assert prompt_format.prompt_ids(user_message(record), []) == prompt_ids
    assert prompt_format.stop_token_ids == tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    # An earlier turn stays in the prompt as GLM-4's chat does: the answer followed by the next <|user|>.
    history_prompt = prompt_format.prompt_ids("下一句", [["第一句", "没有"]])
    assert tokenizer.decode(history_prompt) == "[gMASK]<sop><|user|>\n第一句<|assistant|>\n没有<|user|>\n下一句<|assistant|>"


def test_lora_run_predicts_chats_merges_and_serves(glm4_dirs, lora_run, tmp_path):
    import api_server

    losses = logged_losses(lora_run, 30)
    assert losses[30] < 0.5 * losses[1], losses
    assert json.loads((lora_run / "adapter_model" / "adapter_config.json").read_text())["target_modules"]  # every linear layer

    # predict.py takes the base from the run.
    run_script("predict.py", f"--lora_path={lora_run / 'adapter_model'}", "--num_samples=8", f"--output_dir={tmp_path / 'pred'}",
               "--max_new_tokens=24", "--batch_size=8")
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert metrics["adapter"]["samples"] == 8 and metrics["task"] == "ner"

    # chat_ner.py streams the answer of every typed line.
    chat = SCRIPTS.run(["chat_ner.py", f"--lora_path={lora_run / 'adapter_model'}", "--max_input_tokens=96",
                        "--max_new_tokens=32"],
                       input="蒋玲帆傍晚从佛山回来。\nexit\n")
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "[gMASK]<sop><|user|>" in chat.stdout and "用户：蒋玲帆傍晚从佛山回来。" in chat.stdout

    # merge: the merged folder gives the logits of base + adapter.
    merged = tmp_path / "merged"
    run_script("merge_lora_and_quantize.py", f"--lora_path={lora_run / 'adapter_model'}", f"--output_dir={merged}", "--dtype=fp32")
    with_adapter, tokenizer = load_model_with_adapter(glm4_dirs["glm"], lora_run / "adapter_model", dtype="fp32", device="cpu", fold=False)
    model, merged_tokenizer = load_model_and_tokenizer(merged, dtype="fp32", device="cpu")
    assert type(model).__name__ == "GlmForCausalLM" and merged_tokenizer.chat_template == tokenizer.chat_template
    records = read_instruction_records(DEMO_DEV)[:2]
    prompt_format = get_prompt_format(merged_tokenizer, None)
    ids = torch.tensor([prompt_format.prompt_ids(user_message(records[0]), [])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
    refused = run_script("merge_lora_and_quantize.py", f"--lora_path={lora_run / 'adapter_model'}",
                         f"--output_dir={tmp_path / 'int4'}", "--quant_bits=4", check=False)
    assert refused.returncode != 0 and "ChatGLM's own quantization" in refused.stderr

    # Chat streaming: the reply grows token by token to generate()'s greedy answer; leaving early stops the worker.
    greedy = generate_answers(model, merged_tokenizer, prompt_format, records, max_new_tokens=24, batch_size=2)
    # Our decode engine (utils/decode_engine.py) on a left-padded batch gives transformers' generate() answers (num_beams
    # is an option only generate() takes, so it decodes those).
    assert generate_answers(model, merged_tokenizer, prompt_format, records, max_new_tokens=24, batch_size=2, num_beams=1) == greedy
    replies = list(stream_chat_reply(model, merged_tokenizer, ids[0].tolist(), max_new_tokens=24))
    assert replies[-1].text == greedy[0] and replies[-1].finish_reason in ("stop", "length")
    assert [r.completion_tokens for r in replies] == sorted(r.completion_tokens for r in replies)
    stream = stream_chat_reply(model, merged_tokenizer, ids[0].tolist(), max_new_tokens=24)
    next(stream)
    stream.close()  # returns once the generation stopped: the next one runs at once
    assert list(stream_chat_reply(model, merged_tokenizer, ids[0].tolist(), max_new_tokens=24))[-1].text == greedy[0]

    # The OpenAI-compatible API on the merged folder answers as generate() does, streamed or not.
    app = api_server.create_app(model, merged_tokenizer, dict(api_server.DEFAULTS, model_dir=str(merged), max_new_tokens=24))
    body = {"model": "merged", "messages": [{"role": "user", "content": user_message(records[1])}], "max_tokens": 24, "temperature": 0}

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=120) as client:
            return [await client.post("/v1/chat/completions", json={**body, "stream": stream}) for stream in (False, True)]

    plain, streamed = asyncio.run(ask())
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == greedy[1]
    pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert "".join(pieces) == greedy[1]


def test_chatglm_and_glm4_adapters_are_refused_on_each_others_base(glm4_dirs, lora_run, trained_adapter, trainable_models,
                                                                  tmp_path):
    """One line naming GLM-4 and the ChatGLM version, before the base loads (not PEFT's error listing module names)."""
    chatglm_adapter = trained_adapter("chatglm2-6b") / "adapter_model"
    for base, adapter, trained, named in ((glm4_dirs["glm"], chatglm_adapter, "chatglm2-6b", "GLM-4 (model_type 'glm')"),
                                          (trainable_models["chatglm2-6b"], lora_run / "adapter_model", "GLM-4", "chatglm2-6b")):
        result = run_script("predict.py", f"--model_dir={base}", f"--lora_path={adapter}", "--num_samples=2",
                            f"--output_dir={tmp_path / 'out'}", check=False)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ") or "Traceback" in line]
        assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith(f"error: the adapter {adapter} was trained on {trained} (read from ") and \
            f"but the base {base} is {named};" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_full_and_qlora_training(glm4_dirs, tmp_path):
    run_dir = tmp_path / "full"
    run_script("train_trainer.py", f"--model_dir={glm4_dirs['glm4']}", f"--output_dir={run_dir}", "--method=full",
               "--max_steps=10", "--per_device_train_batch_size=16", "--learning_rate=3e-3", "--warmup_steps=0",
               "--save_steps=10", "--eval_steps=10", "--logging_steps=5", "--report_to=none")
    losses = logged_losses(run_dir, 10)
    assert losses[10] < 0.7 * losses[1], losses
    model, tokenizer = load_model_and_tokenizer(run_dir / "model", dtype="fp32", device="cpu")
    assert type(model).__name__ == "Glm4ForCausalLM" and tokenizer.chat_template
    base, _ = load_model_and_tokenizer(glm4_dirs["glm4"], dtype="fp32", device="cpu")
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, base.state_dict()[name])]
    assert len(changed) == len(base.state_dict())  # every weight trained

    args = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "warmup_steps": 0,
            "logging_steps": 5, "report_to": [], "max_steps": 10, "save_steps": 10, "eval_steps": 10}
    (tmp_path / "args.json").write_text(json.dumps(args))
    qlora_dir = tmp_path / "qlora"
    result = run_script("train_qlora.py", f"--train_args_json={tmp_path / 'args.json'}", f"--model_dir={glm4_dirs['glm']}",
                        f"--output_dir={qlora_dir}", "--dtype=fp32", "--lora_r=32", "--lora_alpha=64", "--lora_dropout=0.0")
    assert "trainable params" in result.stdout
    losses = logged_losses(qlora_dir, 10)
    assert losses[10] < 0.7 * losses[5], losses
    model, _ = load_model_with_adapter(glm4_dirs["glm"], qlora_dir / "adapter_model", dtype="fp32", device="cpu")
    assert type(model).__name__ == "GlmForCausalLM"


@pytest.mark.parametrize("kind", ["glm", "glm4"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                        reason="needs CUDA"))])
def test_the_loaders_fused_layers_give_transformers_loss_and_gradients(glm4_dirs, kind, device):
    """The loader puts GLM-4's norms and MLPs on our kernels (utils/glm_layers.py) under their own names: on the CPU
    they run transformers' formula bit for bit; on CUDA the kernels, as close to fp32's loss and gradients as
    transformers' own layers in bf16."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = load_model_and_tokenizer(glm4_dirs[kind], dtype=dtype, device=device)
    reference = AutoModelForCausalLM.from_pretrained(glm4_dirs[kind], dtype=dtype).to(device)
    fused = {type(module).__name__ for module in model.modules()} - {type(module).__name__ for module in reference.modules()}
    assert fused == {"FusedRMSNorm", "FusedSwiGLUMLP"}
    assert list(model.state_dict()) == list(reference.state_dict())
    copy.deepcopy(model)  # as a reference model for a later stage would be made (a module attribute would refuse)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    exact = [AutoModelForCausalLM.from_pretrained(glm4_dirs[kind], dtype=torch.float32).to(device)] if device == "cuda" else []
    for each in (model, reference, *exact):
        each.train()
        loss = each(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {name: param.grad for name, param in each.named_parameters()}))
    (loss, grads), (expected_loss, expected_grads), *exact_results = results
    if device == "cpu":
        torch.testing.assert_close(loss, expected_loss, atol=0, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], atol=0, rtol=0, msg=name)
        return
    # bf16 on CUDA: each gradient as a whole (entries near zero differ relatively as much as the largest ones do
    # absolutely), its distance to fp32's at most a little over that of transformers' layers in bf16
    (exact_loss, exact_grads), = exact_results

    def error(grad, name):
        return ((grad.float() - exact_grads[name]).norm() / exact_grads[name].norm()).item()

    assert abs(loss.float() - exact_loss) <= 1.5 * abs(expected_loss.float() - exact_loss) + 1e-2 * exact_loss
    for name, grad in grads.items():
        assert error(grad, name) <= 1.5 * error(expected_grads[name], name) + 2e-3, (name, error(grad, name),
                                                                                    error(expected_grads[name], name))


def test_last_position_logits_of_prefill_and_loss_come_from_plain_products(glm4_dirs):
    """A prefill for generation and target_losses's forward (which wants no logits) ask transformers for the last
    position only with an index, not `logits_to_keep=1`: its strided [:, -1:] slice would make a frozen output layer a
    batched product that reads the whole layer once per row (151,552 x 4,096 on GLM-4-9B)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from utils.trainer import target_losses

    model, _ = load_model_and_tokenizer(glm4_dirs["glm"], dtype="fp32", device="cpu")
    model.requires_grad_(False)  # frozen, as under an adapter
    head = model.get_output_embeddings().weight.untyped_storage().data_ptr()

    class Products(TorchDispatchMode):  # the matrix products that read the output layer
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm") and any(
                    isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == head for arg in args):
                self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        with Products() as prefill:
            logits = NativeSteps.of(model, 3, 16).prefill(ids, mask, None, 4)
        with Products() as loss:
            target_losses(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert prefill.names == ["mm"] and loss.names and set(loss.names) == {"mm"}, (prefill.names, loss.names)


def test_train_deepspeed_trains_glm4_without_full_vocabulary_logits(glm4_dirs, tmp_path):
    """train_deepspeed.py computes GLM-4's loss as the Trainer does (target_losses): the output layer sees the last
    position of each row and the target rows, never every position of a batch; and the run learns."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(glm4_dirs["glm"]).vocab_size
    wide = []  # the shapes of every output as wide as the vocabulary

    def record(module, args, output):
        if isinstance(output, torch.Tensor) and output.shape[-1] == vocab:
            wide.append(tuple(output.shape))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_dir = tmp_path / "run"
        run_script("train_deepspeed.py", f"--model_dir={glm4_dirs['glm']}", f"--train_file={DEMO_TRAIN}",
                   f"--dev_file={DEMO_DEV}", f"--output_dir={run_dir}", "--max_steps=12", "--per_device_train_batch_size=8",
                   "--learning_rate=1e-2", "--warmup_steps=0", "--logging_steps=4", "--eval_steps=12", "--save_steps=12")
    finally:
        hook.remove()
    assert wide and all(len(shape) == 2 or shape[1] == 1 for shape in wide), sorted(set(wide))[-3:]
    losses = logged_losses(run_dir, 12)
    assert losses[12] < 0.7 * losses[4], losses


def test_prefills_training_and_evaluation_leave_cudnn_attention_out(glm4_dirs, tmp_path):
    """The calls of a transformers model that meet new shapes all the time (prompt prefills, alone or joined, training
    steps with their backward passes, which run checkpointed layers again, evaluation's length batches) run with
    cuDNN's attention off (it plans every new shape: up to 1.8 s); torch's flags are as they were afterwards."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from test_evaluation import tiny_trainer
    from utils.decode_engine import NativeRows

    class Attention(TorchDispatchMode):  # each attention op, forward and backward, and whether cuDNN's was enabled
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                self.calls.append((func.__name__.split(".")[0], torch.backends.cuda.cudnn_sdp_enabled()))
            return func(*args, **(kwargs or {}))

    trainer = tiny_trainer(glm4_dirs["glm"], DEMO_TRAIN, tmp_path, max_steps=1)
    trainer.model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    with Attention() as training:
        trainer.train()
    assert any(name.endswith("_backward") for name, _ in training.calls), training.calls
    with Attention() as evaluation:
        trainer.evaluate()
    # on the model's device: the Trainer has moved it to the GPU where there is one
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0)).to(trainer.model.device)
    with torch.inference_mode(), Attention() as prefills:
        NativeSteps.of(trainer.model, 2, 16).prefill(ids, torch.ones_like(ids), None, 4)
        NativeRows(trainer.model, 2, 32).prefill([ids[0].tolist(), ids[1, :5].tolist()])
    for calls in (training.calls, evaluation.calls, prefills.calls):
        assert calls and not any(enabled for _, enabled in calls), calls
    assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_chatglm2s_static_step_gives_transformers_tokens_and_scores(kind, glm4_dirs):
    """GLM-4 decodes on ChatGLM2's static cache and step (utils/glm_decode.py: on CUDA its fused kernels, captured as
    a CUDA graph; here eager): on a left-padded batch, the tokens and scores of transformers' own step ("plain"),
    greedy and sampled; the server's rows take the same step."""
    model, tokenizer = load_model_and_tokenizer(glm4_dirs[kind], dtype="fp32", device="cpu")
    batch = tokenizer(["你好", "蒋玲帆傍晚从佛山回来。请找出句子中的人名和地名"], padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any(), "left padding must be exercised"
    plain_ids, plain_scores, _ = decode(model, batch, "plain", do_sample=False, repetition_penalty=1.5)
    assert "_glm_static_kv" not in model.__dict__  # transformers' step on its own cache
    ours_ids, ours_scores, _ = decode(model, batch, "static", do_sample=False, repetition_penalty=1.5)
    assert model.__dict__["_glm_static_kv"].length == batch["input_ids"].shape[1] + 23
    assert ours_ids.tolist() == plain_ids.tolist() and len(set(plain_ids[1].tolist())) > 3
    torch.testing.assert_close(ours_scores, plain_scores, atol=1e-4, rtol=1e-4)
    torch.manual_seed(3)
    sampled_plain = decode(model, batch, "plain", do_sample=True, top_p=0.9, temperature=0.8)[0]
    torch.manual_seed(3)
    assert decode(model, batch, "static", do_sample=True, top_p=0.9, temperature=0.8)[0].tolist() == sampled_plain.tolist()
    assert rows_class(model) is GlmRows


def test_the_fused_qkv_product_follows_the_weights_and_steps_aside_for_adapters(glm4_dirs, monkeypatch, caplog):
    """Where the kernels fuse (the CPU standing for CUDA here), q, k and v run as one product whose weights are copied
    at each generation's start: a weight changed between answers (training, merging) is read by the next one. Without
    room for the copy, and under a LoRA adapter, q, k and v run as their own modules."""
    from peft import LoraConfig, get_peft_model

    from utils import glm_decode
    from utils.glm_decode import chatglm2_modeling

    model, tokenizer = load_model_and_tokenizer(glm4_dirs["glm"], dtype="fp32", device="cpu")
    monkeypatch.setattr(chatglm2_modeling(), "FUSE_DEVICES", ("cuda", "cpu"))
    batch = tokenizer(["你好", "蒋玲帆傍晚从佛山回来。请找出句子中的人名和地名"], padding=True, return_tensors="pt")
    for change in range(2):
        if change:
            with torch.no_grad():
                model.model.layers[0].self_attn.k_proj.weight.mul_(-2.0)  # in place: the same tensor, new values
        plain_ids, plain_scores, _ = decode(model, batch, "plain", do_sample=False, repetition_penalty=1.5)
        ours_ids, ours_scores, _ = decode(model, batch, "static", do_sample=False, repetition_penalty=1.5)
        assert len(model.__dict__["_glm_fused_qkv"]) == 2
        assert ours_ids.tolist() == plain_ids.tolist()
        torch.testing.assert_close(ours_scores, plain_scores, atol=1e-4, rtol=1e-4)
    # A device with too little memory beside the weights for the copy: the three products, said once.
    model.__dict__.pop("_glm_fused_qkv")
    monkeypatch.setattr(glm_decode, "device_bytes_free", lambda device: glm_decode.FUSED_COPY_HEADROOM)
    with caplog.at_level(logging.WARNING, logger="utils.glm_decode"):
        for _ in range(2):
            ours_ids, _, _ = decode(model, batch, "static", do_sample=False, repetition_penalty=1.5)
    assert model.__dict__["_glm_fused_qkv"] is False and ours_ids.tolist() == plain_ids.tolist()
    assert [r.getMessage()[:43] for r in caplog.records] == ["GLM-4 decodes q, k and v as three products "]
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain_ids, plain_scores, _ = decode(adapted, batch, "plain", do_sample=False, repetition_penalty=1.5)
    ours_ids, ours_scores, _ = decode(adapted, batch, "static", do_sample=False, repetition_penalty=1.5)
    assert "_glm_fused_qkv" not in adapted.__dict__ and ours_ids.tolist() == plain_ids.tolist()
    torch.testing.assert_close(ours_scores, plain_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused decode kernels run on CUDA only")
@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_the_fused_step_on_cuda_gives_transformers_scores(kind, glm4_dirs):
    """fp16 on CUDA, the step captured as a CUDA graph: the fused attention and the adds inside the norms give the
    scores of transformers' own step within fp16 rounding, along the fused step's tokens."""
    model, tokenizer = load_model_and_tokenizer(glm4_dirs[kind], dtype="fp16", device="cuda")
    batch = tokenizer(["你好", "蒋玲帆傍晚从佛山回来。请找出句子中的人名和地名"], padding=True, return_tensors="pt").to("cuda")
    fused_ids, fused_scores, _ = decode(model, batch, "graph", do_sample=False, repetition_penalty=1.5)
    assert "_glm_static_kv" in model.__dict__
    _, plain_scores, _ = decode(model, batch, "plain", force=fused_ids, do_sample=False, repetition_penalty=1.5)
    assert len(set(fused_ids[1].tolist())) > 3
    assert_within_rounding(fused_scores, plain_scores, fused_ids)


@torch.inference_mode()
def test_the_step_compiled_in_the_background_serves_steps_of_its_shapes(glm4_dirs):
    """A chat does not wait for torch.compile: its first answer runs on the eager step with no compiler beside it,
    and its end starts the compilation in a thread, on buffers of its own; the steps of an answer with those shapes
    then run that code without compiling again, and it computes what the eager step does."""
    model, tokenizer = load_model_and_tokenizer(glm4_dirs["glm"], dtype="fp32", device="cpu")
    ids = torch.tensor([get_prompt_format(tokenizer, None).prompt_ids("今天北京天气怎么样", [])])
    steps = NativeSteps.of(model, 1, ids.shape[1] + 8)
    compiler = NativeCompiler.of(model)
    first = StepRunner(model, steps, "compiled", wait_for_compile=False)
    assert first.mode == "graph" and not compiler.threads  # nothing compiles while the first answer runs
    first.answer_done()
    assert list(compiler.threads) == [steps.key]
    compiler.wait()
    assert steps.compiled_ready(start=False)
    assert StepRunner(model, steps, "compiled", wait_for_compile=False).mode == "compiled"  # the next answer
    token = steps.prefill(ids, torch.ones_like(ids), None, 8).argmax(-1, keepdim=True)
    steps.advance()
    eager = steps.forward(token)
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = steps.compiled_forward()(token)  # rewrites the same key and value at this position
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)  # fused kernels round in their own order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decode_on_cuda_equals_the_eager_loop(glm4_dirs):
    model, tokenizer = load_model_and_tokenizer(glm4_dirs["glm"], dtype="fp32", device="cuda")
    prompt_format = get_prompt_format(tokenizer, None)
    records = read_instruction_records(DEMO_DEV)[:6]
    plain = generate_answers(model, tokenizer, prompt_format, records, max_new_tokens=24, batch_size=3, decode="plain")
    assert generate_answers(model, tokenizer, prompt_format, records, max_new_tokens=24, batch_size=3, decode="auto") == plain
    ids = prompt_format.prompt_ids(user_message(records[0]), [])
    streamed = [r.text for r in stream_chat_reply(model, tokenizer, ids, max_new_tokens=24, decode="auto")]
    # (a random model writes broken UTF-8 too: the streamed reply drops a trailing half character)
    assert streamed[-1] == generate_answers(model, tokenizer, prompt_format, records[:1], max_new_tokens=24, decode="plain")[0].rstrip("\ufffd")
    # The chat did not wait for torch.compile (its step compiled in the background): once ready, the next answer runs on
    # the compiled step, with the same answer.
    NativeCompiler.of(model).wait()
    assert [r.text for r in stream_chat_reply(model, tokenizer, ids, max_new_tokens=24, decode="auto")] == streamed

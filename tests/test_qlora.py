"""train_qlora.py on tiny models, on CPU: bitsandbytes NF4 (double quantization) base weights, LoRA on every linear
layer; it overfits 16 real MSRA examples, the adapter reloads onto the 4-bit base and decodes the trained answers,
and a resumed run ends where an uninterrupted one does. --method=ptuning trains a P-tuning v2 prefix alone on the NF4
(or LLM.int8) base, writes it as train_trainer.py does, and it reloads onto the quantized base and the float one."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import REPO_ROOT, VERSIONS, train_then_resume
from test_ptuning import mean_loss
from test_training import final_train_loss, logged_losses, run_script
from utils.generation import generate_answers
from utils.adapters import adapter_disabled, load_model_with_adapter, load_prefix_checkpoint
from utils.model_loading import load_model_and_tokenizer
from utils.prompts import get_prompt_format
from utils.records import read_instruction_records
from utils.training_methods import kbit_quantization_config

LORA = ["--lora_r=32", "--lora_alpha=64", "--lora_dropout=0.0"]
# Steps (one epoch each) to memorise the 16 answers at learning rate 1.5e-2; the tiny ChatGLM-6B (130k vocabulary,
# 2-D positions) learns the slowest.
OVERFIT_STEPS = {"chatglm-6b": 50, "chatglm2-6b": 40, "chatglm3-6b": 40}


def train_args_json(tmp_path, **values):
    """The shipped chatGLM_6B_QLoRA.json with a test-sized schedule."""
    args = json.loads((REPO_ROOT / "chatGLM_6B_QLoRA.json").read_text())
    args.update(per_device_train_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_steps=0,
                logging_steps=5, report_to=[], max_grad_norm=1.0)
    args.update(values)
    path = tmp_path / "train_args.json"
    path.write_text(json.dumps(args))
    return path


@pytest.mark.parametrize("version", VERSIONS)
def test_train_qlora_overfits_and_the_adapter_reproduces_the_answers(version, trainable_models, sixteen_examples, tmp_path):
    from transformers import BitsAndBytesConfig

    run_dir, steps = tmp_path / "run", OVERFIT_STEPS[version]
    args_json = train_args_json(tmp_path, max_steps=steps, save_steps=steps, eval_steps=steps, learning_rate=1.5e-2)
    result = run_script("train_qlora.py", f"--train_args_json={args_json}", f"--model_dir={trainable_models[version]}",
                        f"--train_file={sixteen_examples}", f"--dev_file={sixteen_examples}",
                        f"--output_dir={run_dir}", "--dtype=fp32", *LORA)
    assert "trainable params" in result.stdout
    # The shipped JSON checkpoints: on a GPU, ChatGLM2/3's blocks then train as CUDA graphs (utils/graphed_blocks.py)
    # and ChatGLM-6B's are said not to; a CPU run is not told about graphs at all.
    if not torch.cuda.is_available():
        assert "graph_blocks" not in result.stdout
    elif version == "chatglm-6b":
        assert "graph_blocks: off (not ChatGLM2/3" in result.stdout
    else:
        assert "graph_blocks: the blocks train as CUDA graphs" in result.stdout
    losses = logged_losses(run_dir, steps)
    assert losses[steps] < 0.5 * losses[1], losses
    adapter_dir = run_dir / "adapter_model"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device="cpu", quantization_config=quantization)
    assert sum(type(module).__name__ == "Linear4bit" for module in base.modules()) == 4 * base.config.num_layers
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    records = read_instruction_records(sixteen_examples)
    answers = generate_answers(model, tokenizer, get_prompt_format(tokenizer, version), records, max_new_tokens=48, batch_size=16)
    expected = [tokenizer.decode(tokenizer.encode(r["answer"], add_special_tokens=False)).strip() for r in records]
    assert answers == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_kbit_preparation_keeps_unquantized_weights_in_the_compute_dtype(version, trainable_models):
    from transformers import BitsAndBytesConfig

    from utils.training_methods import add_lora, prepare_kbit_model

    dtype = torch.bfloat16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype=dtype, device="cpu", quantization_config=quantization)
    model = prepare_kbit_model(model, dtype)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_input_embeddings().weight.dtype == dtype and model.get_output_embeddings().weight.dtype == dtype
    unquantized = [p for p in model.parameters() if type(p).__name__ != "Params4bit"]
    assert unquantized and all(p.dtype == dtype for p in unquantized)  # norms and biases too: no fp32 copies
    blocks = model.transformer.layers if version == "chatglm-6b" else model.transformer.encoder.layers
    assert all(block.gradient_checkpointing for block in blocks)
    assert blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}

    lora = add_lora(model, {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all"})
    adapters = {name: p for name, p in lora.named_parameters() if "lora_" in name}
    assert len(adapters) == 2 * 4 * model.config.num_layers
    assert {name for name, p in lora.named_parameters() if p.requires_grad} == set(adapters)
    assert all(p.dtype == torch.float32 for p in adapters.values())
    # A training step reaches every adapter through the checkpointed blocks (lora_B starts at zero, so lora_A's
    # gradient is zero on the first step; lora_B's is not).
    lora.train()
    batch = tokenizer(["你好", "ChatGLM-6B是清华大学开源的模型"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    outputs = lora(**batch, labels=labels)
    assert outputs.logits is None and outputs.loss.dtype == torch.float32 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapters.values())
    assert all(p.grad.abs().sum() > 0 for name, p in adapters.items() if "lora_B" in name)


def test_train_qlora_resumed_run_ends_at_the_uninterrupted_loss(trainable_models, sixteen_examples, tmp_path):
    args_json = train_args_json(tmp_path, max_steps=20, save_steps=10, eval_strategy="no", per_device_train_batch_size=4,
                                learning_rate=3e-3)
    common = [f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm2-6b']}",
              f"--train_file={sixteen_examples}", "--dev_file=none", "--dtype=fp32", *LORA]
    full, interrupted, result = train_then_resume(run_script, "train_qlora.py", tmp_path, common, 10, 20)
    assert f"resumed from {interrupted / 'checkpoint-10'} (step 10 of 20)" in result.stdout
    uninterrupted, resumed = logged_losses(full, 20), logged_losses(interrupted, 20)
    assert resumed[20] == pytest.approx(uninterrupted[20], rel=0.01)
    assert resumed[15] == pytest.approx(uninterrupted[15], rel=0.01)
    assert final_train_loss(interrupted) == pytest.approx(final_train_loss(full), rel=1e-3)  # over all 20 steps
    # The run record of checkpoint-10 is the final one's without the metrics, with the TrainingArguments file's values.
    final = json.loads((full / "adapter_model" / "train_args.json").read_text())
    record = json.loads((full / "checkpoint-10" / "train_args.json").read_text())
    assert record == {key: value for key, value in final.items() if key not in ("metrics", "wall_seconds")}
    assert record["training_arguments"] == json.loads(args_json.read_text())
    # Another base, or another learning rate in the file: refused with both values, before the model loads.
    v2, v3 = trainable_models["chatglm2-6b"], trainable_models["chatglm3-6b"]
    checkpoint = interrupted / "checkpoint-20"
    result = run_script("train_qlora.py", f"--output_dir={interrupted}", "--resume_from_checkpoint=auto", *common,
                        f"--model_dir={v3}", check=False, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"error: --model_dir: the run in {checkpoint} was trained on chatglm2-6b ({v2}), this resume gives chatglm3-6b "
            f"({v3}); start a new run") in result.stderr
    (tmp_path / "faster").mkdir()
    faster = train_args_json(tmp_path / "faster", max_steps=20, save_steps=10, eval_strategy="no", per_device_train_batch_size=4,
                             learning_rate=1e-2)
    result = run_script("train_qlora.py", f"--output_dir={interrupted}", "--resume_from_checkpoint=auto", *common,
                        f"--train_args_json={faster}", check=False, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"error: --train_args_json: {faster}: 'learning_rate': the run in {checkpoint} was trained with 0.003, this "
            "resume gives 0.01; start a new run") in result.stderr
    assert "trainable params" not in result.stdout


def test_train_qlora_rejects_unknown_training_arguments(trainable_models, sixteen_examples, tmp_path):
    args_json = train_args_json(tmp_path, max_steps=1, learning_rat=1e-3)
    result = run_script(
        "train_qlora.py", f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm2-6b']}",
        f"--train_file={sixteen_examples}", f"--output_dir={tmp_path / 'run'}", timeout=300, check=False,
    )
    assert result.returncode != 0 and "learning_rat" in result.stderr and str(args_json) in result.stderr


PRE_SEQ_LEN = 16
PTUNING_STEPS = 8
PREFIX = "transformer.prefix_encoder."


@pytest.mark.parametrize("version,bits,projection", [("chatglm2-6b", 4, False), ("chatglm3-6b", 8, True)])
def test_train_qlora_ptuning_trains_the_prefix_alone_on_the_kbit_base_and_it_reloads(version, bits, projection, trainable_models,
                                                                                      sixteen_examples, tmp_path):
    """ChatGLM2 on NF4; ChatGLM3 on LLM.int8 with prefix_projection (its MLP must stay a float module: quantized it
    could neither train nor run). ChatGLM-6B trains on NF4 in the resume test below."""
    run_dir, model_dir = tmp_path / "run", trainable_models[version]
    # A high constant rate: the prefix of a 2-layer random model moves the loss within a few steps. The run evaluates
    # once, at its end.
    args_json = train_args_json(tmp_path, max_steps=PTUNING_STEPS, save_steps=PTUNING_STEPS, eval_strategy="no",
                                learning_rate=1.0, lr_scheduler_type="constant", logging_steps=4)
    result = run_script("train_qlora.py", f"--train_args_json={args_json}", f"--model_dir={model_dir}",
                        f"--train_file={sixteen_examples}", f"--dev_file={sixteen_examples}", f"--output_dir={run_dir}",
                        "--dtype=fp32", "--method=ptuning", f"--pre_seq_len={PRE_SEQ_LEN}", f"--prefix_projection={projection}",
                        f"--quant_bits={bits}")
    losses = logged_losses(run_dir, PTUNING_STEPS)
    assert losses[PTUNING_STEPS] < 0.95 * losses[1], losses

    prefix_dir = run_dir / "prefix_model"
    assert {"config.json", "model.safetensors", "train_args.json"} == {p.name for p in prefix_dir.iterdir()}
    weights = load_file(str(prefix_dir / "model.safetensors"))
    expected = {"embedding.weight"} | ({"trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"} if projection else set())
    assert set(weights) == {PREFIX + name for name in expected}
    assert all(t.dtype == torch.float32 for t in weights.values())  # trained in fp32
    # The trained tensors are all that trained (no LoRA beside them), and all a checkpoint holds.
    assert f"trainable params: {sum(t.numel() for t in weights.values()):,} ||" in result.stdout
    assert set(load_file(str(run_dir / f"checkpoint-{PTUNING_STEPS}" / "model.safetensors"))) == set(weights)
    config = json.loads((prefix_dir / "config.json").read_text())
    assert config["pre_seq_len"] == PRE_SEQ_LEN and config["prefix_projection"] is projection
    assert "quantization_config" not in config  # the prefix is no quantized model
    train_args = json.loads((prefix_dir / "train_args.json").read_text())
    assert train_args["script"] == "train_qlora.py" and train_args["model_version"] == version
    assert train_args["config"]["method"] == "ptuning" and train_args["config"]["quant_bits"] == bits

    # On the same k-bit base, on the device that trained (the GPU if there is one), the prefix gives the run's final
    # evaluation loss again.
    quantization = kbit_quantization_config(bits, torch.float32, ptuning=True)
    base, tokenizer = load_model_and_tokenizer(model_dir, dtype="fp32", device="auto", quantization_config=quantization,
                                               pre_seq_len=PRE_SEQ_LEN, prefix_projection=projection)
    assert sum(type(m).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt") for m in base.modules()) == 4 * base.config.num_layers
    load_prefix_checkpoint(base, prefix_dir)
    # The run evaluated in batches sorted by length; LLM.int8 picks its fp16 outlier columns per batch, so there the
    # figure of other batches differs in the sixth digit.
    tolerance = 1e-5 if bits == 4 else 1e-4
    assert mean_loss(base, tokenizer, version, sixteen_examples) == pytest.approx(train_args["metrics"]["eval_loss"],
                                                                                  rel=tolerance)

    # predict.py's way (--lora_path=<run>/prefix_model): onto the unquantized base, where it helps as well.
    model, tokenizer = load_model_with_adapter(model_dir, prefix_dir, dtype="fp32", device="cpu")
    assert model.transformer.pre_seq_len == PRE_SEQ_LEN
    with adapter_disabled(model):
        without = mean_loss(model, tokenizer, version, sixteen_examples)
    assert mean_loss(model, tokenizer, version, sixteen_examples) < without


def test_train_qlora_ptuning_resumed_run_ends_at_the_uninterrupted_loss(trainable_models, sixteen_examples, tmp_path):
    """ChatGLM-6B (its own prefix encoder and model code) on NF4: the checkpoint holds the prefix alone, and the resumed
    run ends with the prefix and losses of the uninterrupted one."""
    args_json = train_args_json(tmp_path, max_steps=8, save_steps=4, eval_strategy="no", per_device_train_batch_size=4,
                                learning_rate=0.1, logging_steps=2)
    common = [f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm-6b']}", f"--train_file={sixteen_examples}",
              "--dev_file=none", "--dtype=fp32", "--method=ptuning", f"--pre_seq_len={PRE_SEQ_LEN}"]
    full, interrupted, _ = train_then_resume(run_script, "train_qlora.py", tmp_path, common, 4, 8)
    assert list(load_file(str(interrupted / "checkpoint-4" / "model.safetensors"))) == [PREFIX + "embedding.weight"]
    uninterrupted, resumed = logged_losses(full, 8), logged_losses(interrupted, 8)
    assert resumed[6] == pytest.approx(uninterrupted[6], rel=1e-4) and resumed[8] == pytest.approx(uninterrupted[8], rel=1e-4)
    prefixes = [load_file(str(run / "prefix_model" / "model.safetensors")) for run in (full, interrupted)]
    # Adam at lr 0.1 turns float-rounding differences (CPU reductions in another order under load) on elements with a
    # near-zero gradient into up to ~1e-4 (seen once in a full-suite run); a resume that lost the optimizer state or
    # the schedule moves the prefix by the order of the learning rate.
    torch.testing.assert_close(prefixes[1], prefixes[0], rtol=1e-3, atol=5e-4)


def test_train_qlora_refuses_other_methods_and_bit_widths(trainable_models, sixteen_examples, tmp_path):
    common = [f"--train_args_json={train_args_json(tmp_path, max_steps=1)}", f"--model_dir={trainable_models['chatglm2-6b']}",
              f"--train_file={sixteen_examples}", f"--output_dir={tmp_path / 'run'}"]
    result = run_script("train_qlora.py", *common, "--method=freeze", timeout=300, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: --method='freeze': use lora (LoRA adapters) or ptuning (a P-tuning v2 prefix)" in result.stderr
    result = run_script("train_qlora.py", *common, "--quant_bits=2", timeout=300, check=False)
    assert result.returncode == 1 and "error: --quant_bits=2: use 4" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_train_qlora_takes_train_trainers_flags_over_its_json_file(trainable_models, sixteen_examples, tmp_path):
    """The options of train_trainer.py as flags: they reach the run and its record, over the --train_args_json file's
    values, which come over the shared defaults; the file's other TrainingArguments fields (optim) reach the run."""
    args_json = train_args_json(tmp_path, max_steps=9, learning_rate=1e-2, optim="sgd", logging_steps=1)
    run_dir = tmp_path / "run"
    run_script("train_qlora.py", f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm2-6b']}",
               f"--train_file={sixteen_examples}", "--dev_file=none", f"--output_dir={run_dir}", "--dtype=fp32",
               "--max_steps=2", "--save_steps=2", "--learning_rate=5e-3", "--lr_scheduler_type=constant", "--seed=7")
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert [(e["step"], e["learning_rate"]) for e in state["log_history"] if "loss" in e] == [(1, 5e-3), (2, 5e-3)]
    record = json.loads((run_dir / "adapter_model" / "train_args.json").read_text())
    config = record["config"]
    assert (config["max_steps"], config["learning_rate"], config["seed"], config["logging_steps"]) == (2, 5e-3, 7, 1)
    assert config["lora"] == {"r": 32, "alpha": 64, "dropout": 0.05, "target_modules": "all"}  # train_trainer.py's
    assert record["training_arguments"]["optim"] == "sgd"
    assert torch.load(run_dir / "checkpoint-2" / "training_args.bin", weights_only=False).optim == "sgd"


def test_transformers_refuses_a_quantized_base_by_its_is_quantized_flag():
    """utils/trainer.py's quantized_base_may_train lets P-tuning train on a k-bit base by showing the model
    unquantized while the Trainer is built: this fails loudly if a transformers release checks something else."""
    from transformers.trainer_utils import validate_quantization_for_training

    from utils.trainer import quantized_base_may_train

    model = torch.nn.Linear(2, 2)
    model.is_quantized = True
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)
    with quantized_base_may_train(model, trainable_only=True):
        validate_quantization_for_training(model)
    assert model.is_quantized

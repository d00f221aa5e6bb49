"""Bad options and inputs of the training scripts: one line `error: --option: what is wrong, what is allowed`, exit
status 1, no traceback, and before the model loads; checked in the order a user needs them (model folder, data files,
options, output folder). Runs the real scripts on the tiny ChatGLM2 folder and MSRA records from ../shared."""
import json
import os

import pytest

from conftest import run_script

LOADED = "trainable params"  # printed once the model has loaded


def refused(script, *args):
    """The last stderr line of a run that must stop with one line, before the model loads."""
    result = run_script(script, *args, timeout=300, check=False)
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr and LOADED not in result.stdout, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def inputs(tiny_model_dirs, sixteen_examples, tmp_path):
    return [f"--model_dir={tiny_model_dirs['chatglm2-6b']}", f"--train_file={sixteen_examples}", "--dev_file=none",
            f"--output_dir={tmp_path / 'run'}"]


REPORTERS = ("azure_ml, clearml, codecarbon, comet_ml, dagshub, dvclive, flyte, kubeflow, mlflow, neptune, swanlab, "
             "tensorboard, trackio, wandb")
OPTION_ERRORS = [
    ("train_trainer.py", ["--pre_seq_len=-4"],
     "--pre_seq_len=-4: P-tuning's prefix length must be at least 1 (the official runs used 128)"),
    ("train_deepspeed.py", ["--method=ptuning", "--pre_seq_len=0"],
     "--pre_seq_len=0: P-tuning's prefix length must be at least 1 (the official runs used 128)"),
    *[("train_trainer.py", ["--method=freeze", f"--freeze_trainable_layers={n}"],
       f"--freeze_trainable_layers={n}: the model has 2 blocks; give 1..2 (the last N) or -1..-2 (the first N)") for n in (99, 0, -99)],
    ("train_deepspeed.py", ["--method=freeze", "--freeze_trainable_modules=mlp,bogus"],
     "--freeze_trainable_modules='mlp,bogus': ['bogus'] matches nothing in a block; use all, or names from a block's "
     "parameters ['input_layernorm.weight', 'mlp.dense_4h_to_h.weight', 'mlp.dense_h_to_4h.weight', "
     "'post_attention_layernorm.weight', 'self_attention.dense.weight', 'self_attention.query_key_value.bias', "
     "'self_attention.query_key_value.weight']"),
    ("train_trainer.py", ["--method=freeze", "--freeze_extra_modules=final_layernorm,bogus"],
     "--freeze_extra_modules='final_layernorm,bogus': ['bogus'] match no parameter outside the blocks; those are "
     "['transformer.embedding.word_embeddings.weight', 'transformer.encoder.final_layernorm.weight', "
     "'transformer.output_layer.weight']"),
    ("train_trainer.py", ["--packing=true", "--pack_tokens=0"], "--pack_tokens=0: must be a whole number of at least 1 (tokens per packed row)"),
    ("train_deepspeed.py", ["--pack_tokens=-8"], "--pack_tokens=-8: must be a whole number of at least 1 (tokens per packed row)"),
    ("train_trainer.py", ["--lora_target_modules=query_key_value,bogus"],
     "--lora_target_modules='query_key_value,bogus': ['bogus'] is no linear layer of {model}; use all, or a comma list of "
     "dense, dense_4h_to_h, dense_h_to_4h, output_layer, query_key_value"),
    ("train_qlora.py", ["--lora_target_modules=bogus"],
     "--lora_target_modules='bogus': ['bogus'] is no linear layer of {model}; use all, or a comma list of "
     "dense, dense_4h_to_h, dense_h_to_4h, output_layer, query_key_value"),
    ("train_trainer.py", ["--lora_r=0"], "--lora_r=0: must be a whole number of at least 1 (the LoRA rank)"),
    ("train_qlora.py", ["--lora_r=0"], "--lora_r=0: must be a whole number of at least 1 (the LoRA rank)"),
    ("train_trainer.py", ["--dtype=fp8"], "--dtype='fp8': use auto, fp32, fp16 or bf16"),
    ("train_qlora.py", ["--dtype=fp8"], "--dtype='fp8': use auto, fp32, fp16 or bf16"),
    ("train_trainer.py", ["--report_to=wandb"],
     "--report_to='wandb': wandb needs the package wandb, which is not installed (pip install wandb), or use none"),
    ("train_trainer.py", ["--report_to=tensorbord"],
     f"--report_to='tensorbord': 'tensorbord' is not a reporter train_trainer.py knows; use none or a comma list of {REPORTERS}"),
    ("train_deepspeed.py", ["--report_to=wandb"],
     "--report_to='wandb': 'wandb' is not a reporter train_deepspeed.py knows; use none or a comma list of tensorboard"),
    ("train_qlora.py", ["--quant_bits=3"], "--quant_bits=3: use 4 (NF4 with double quantization) or 8 (LLM.int8)"),
    ("train_qlora.py", ["--method=freeze"],
     "--method='freeze': use lora (LoRA adapters) or ptuning (a P-tuning v2 prefix); train_qlora.py trains no freeze or full "
     "(train_trainer.py does)"),
    ("train_trainer.py", ["--max_source_length=0"], "--max_source_length=0: must be a whole number of at least 1 (tokens of a prompt)"),
    ("train_deepspeed.py", ["--per_device_train_batch_size=0"],
     "--per_device_train_batch_size=0: must be a whole number of at least 1 (samples (or packed rows) per step and device)"),
    ("train_trainer.py", ["--gradient_accumulation_steps=-1"],
     "--gradient_accumulation_steps=-1: must be a whole number of at least 1 (micro-batches per step)"),
    ("train_trainer.py", ["--lora_dropout=1.5"], "--lora_dropout=1.5: a probability, at least 0 and below 1"),
    ("train_trainer.py", ["--data_format=xml"], "--data_format='xml': use instruction or text"),
    ("train_deepspeed.py", ["--lr_scheduler_type=cosin"],
     "--lr_scheduler_type='cosin': use one of linear, cosine, cosine_with_restarts, polynomial, constant, "
     "constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, cosine_warmup_with_min_lr, "
     "warmup_stable_decay, greedy"),
    ("train_trainer.py", ["--seed=-1"], "--seed=-1: use a whole number from 0 to 4294967295"),
    ("train_trainer.py", ["--num_train_epochs=0"], "--num_train_epochs=0.0: must be above 0 (or set --max_steps above 0)"),
    ("train_deepspeed.py", ["--deepspeed=no_such.json"],
     "--deepspeed=no_such.json: no such file; give a DeepSpeed config such as deepspeed.json"),
]


@pytest.mark.parametrize("script,args,expected", OPTION_ERRORS, ids=[f"{s}:{' '.join(a)}" for s, a, _ in OPTION_ERRORS])
def test_a_bad_option_is_one_line_before_the_model_loads(script, args, expected, inputs, tiny_model_dirs):
    assert refused(script, *inputs, *args) == "error: " + expected.format(model=tiny_model_dirs["chatglm2-6b"])


def test_train_args_json_must_be_a_json_object(inputs, tmp_path):
    missing = tmp_path / "missing.json"
    assert refused("train_qlora.py", *inputs, f"--train_args_json={missing}") == (
        f'error: --train_args_json={missing}: no such file; give a JSON file holding one object ({{"key": value, ...}})')
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert refused("train_qlora.py", *inputs, f"--train_args_json={listed}") == (
        f'error: --train_args_json={listed}: holds a JSON list; expected one object ({{"key": value, ...}})')
    reporting = tmp_path / "wandb.json"
    reporting.write_text(json.dumps({"max_steps": 2, "report_to": ["wandb"]}))
    assert refused("train_qlora.py", *inputs, f"--train_args_json={reporting}") == (
        f"error: --train_args_json={reporting}: report_to='wandb': wandb needs the package wandb, which is not installed "
        "(pip install wandb), or use none")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"learning_rate": 2e-2, "lerning_rate": 1}))
    assert refused("train_qlora.py", *inputs, f"--train_args_json={unknown}").startswith(
        f"error: --train_args_json={unknown}: Some keys are not used by the HfArgumentParser: ['lerning_rate']")


def test_checks_come_in_the_order_a_user_needs_them(tiny_model_dirs, sixteen_examples, tmp_path):
    model = f"--model_dir={tiny_model_dirs['chatglm2-6b']}"
    held = tmp_path / "held"
    (held / "adapter_model").mkdir(parents=True)  # a folder that holds a run
    typo = tmp_path / "tarin.txt"
    # A typo in the data file is reported as such, not as the output folder in the way; so are bad options.
    assert refused("train_trainer.py", model, f"--train_file={typo}", f"--output_dir={held}") == f"error: --train_file={typo}: not found"
    assert refused("train_trainer.py", model, f"--train_file={sixteen_examples}", "--lora_r=0", f"--output_dir={held}") == (
        "error: --lora_r=0: must be a whole number of at least 1 (the LoRA rank)")
    # The model folder comes first.
    missing_model = tmp_path / "no_model"
    assert refused("train_deepspeed.py", f"--model_dir={missing_model}", f"--train_file={typo}", "--lora_r=0") == (
        f"error: --model_dir={missing_model}: no such folder")
    adapter = tmp_path / "an_adapter"  # what --lora_path takes, given as the base
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert refused("train_trainer.py", f"--model_dir={adapter}") == (
        f"error: --model_dir={adapter}: a LoRA adapter, not a model folder; it goes in --lora_path, with its base in "
        "--model_dir")
    # The default data files of a data set that process.py has not made yet.
    assert refused("train_qlora.py", model, "--data_name=no_such_set") == (
        "error: data/no_such_set/instruct_data/train.txt: not found; make it with process.py first (python process.py "
        "--data_name no_such_set ..., see README), or give --train_file")
    # An explicit dev file that is missing, a folder or a FIFO is an error, not "training without evaluation".
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for dev, what in ((tmp_path / "dev.txt", "not found"), (tmp_path, "a folder, not a data file (one JSON record a line)"),
                      (fifo, "not a regular file (a FIFO, socket or device); give a data file (one JSON record a line)")):
        for script in ("train_trainer.py", "train_qlora.py"):
            assert refused(script, model, f"--train_file={sixteen_examples}", f"--dev_file={dev}",
                           f"--output_dir={tmp_path / 'run'}") == f"error: --dev_file={dev}: {what}"
    assert refused("train_deepspeed.py", model, f"--train_file={fifo}") == (
        f"error: --train_file={fifo}: not a regular file (a FIFO, socket or device); give a data file (one JSON record a line)")
    assert not (tmp_path / "run").exists() and not list(held.parent.glob(".*.lock"))

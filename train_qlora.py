"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B on a quantized base (QLoRA): the base weights in bitsandbytes
NF4 with double quantization (--quant_bits=4, the default) or LLM.int8 (--quant_bits=8), frozen; trained on top of
them with the Hugging Face Trainer, either LoRA adapters on every linear layer (--method=lora, the default) or
THUDM's P-tuning v2 prefix (--method=ptuning: only the prefix encoder trains, in fp32, as in train_trainer.py).
Both bit widths also run on CPU (bitsandbytes' CPU backend), slowly.

    python train_qlora.py --train_args_json chatGLM_6B_QLoRA.json --model_dir model_hub/chatglm2-6b \\
        --train_file data/msra/instruct_data/train.txt --dev_file data/msra/instruct_data/dev.txt \\
        --lora_r 8 --lora_dropout 0.05 --dtype bf16
    python train_qlora.py --data_name msra --resume_from_checkpoint auto
    python train_qlora.py --train_args_json my_ptuning.json --model_dir model_hub/chatglm2-6b --data_name msra \\
        --method ptuning --pre_seq_len 128 --quant_bits 8     # the JSON with learning_rate 2e-2, as officially

The JSON file holds TrainingArguments (steps, batch size, learning rate, optimizer, ...). Writes
checkpoint/<data_name>/train_qlora/ (unless the JSON or --output_dir names a folder): adapter_model/ (PEFT
adapter + train_args.json) or, with --method=ptuning, prefix_model/ (the prefix in the official layout, as
train_trainer.py writes it, + train_args.json; it goes on the unquantized base by --lora_path), checkpoint-N/ for
resuming (with ptuning: the prefix only; each with train_args.json, whose settings a resume takes), runs/ (TensorBoard), loss.png.
"""
import os
import time
from pathlib import Path

import utils.log_filters  # noqa: F401, I001  (before the libraries: bitsandbytes logs a known-harmless message on import)
import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed

from utils.config_utils import ConfigError, parse_config
from utils.dataset import PaddingCollator
from utils.model_loading import load_model_and_tokenizer, resolve_device, resolve_dtype
from utils.train_utils import (
    Trainer,
    add_lora,
    check_report_to,
    check_training_start,
    checkpoint_dir,
    finish_trainer_run,
    kbit_quantization_config,
    load_datasets,
    read_json_object,
    prefix_settings,
    prepare_kbit_model,
    print_trainable_parameters,
    train_prefix_only,
)
from utils.run_dirs import RunFolder, find_resume_checkpoint
from utils.run_record import check_resume_matches

DEFAULTS = {
    "train_args_json": "chatGLM_6B_QLoRA.json",
    "model_dir": "model_hub/chatglm2-small",
    "data_name": "demo_ner",
    "train_file": "",  # default: data/<data_name>/instruct_data/train.txt
    "dev_file": "",  # default: data/<data_name>/instruct_data/dev.txt if it exists; none: no evaluation
    "output_dir": "",  # default: the JSON's output_dir, else checkpoint/<data_name>/train_qlora
    "max_source_length": 256,
    "max_target_length": 128,
    "skip_bad_lines": False,
    "loss_on_all_turns": False,  # multi-turn records: every history answer is learnt, not only the last answer
    # (ChatGLM3 conversation records always learn every assistant message without "loss": false)
    "show_example": False,  # print the first training sample: its tokens, ids and which of them are in the loss
    "method": "lora",  # lora: LoRA adapters; ptuning: a P-tuning v2 prefix (both on the frozen quantized base)
    "quant_bits": 4,  # the base: 4 = bitsandbytes NF4 with double quantization (QLoRA), 8 = bitsandbytes LLM.int8
    # method=ptuning, as in train_trainer.py: learnt keys and values of pre_seq_len positions in every layer; with
    # prefix_projection they come from a two-layer MLP (kept unquantized). The official runs used 128 and lr 2e-2.
    "pre_seq_len": 128,
    "prefix_projection": False,
    # target_modules: all = every linear layer of the blocks; or a comma list such as query_key_value
    "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "all"},
    "dtype": "auto",  # dtype of the k-bit matmuls and the other weights: auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16
    "gradient_checkpointing": True,
    "resume_from_checkpoint": "",  # "auto" = the newest complete checkpoint-N in the output folder, or a path
    "overwrite_output_dir": False,  # replace a finished run (kept as <output_dir>.previous until this one has finished)
}

# The names this script had before the training scripts shared one vocabulary (accepted for one more release).
RENAMED = {"train_data_path": "train_file", "eval_data_path": "dev_file", "lora_rank": "lora_r", "compute_dtype": "dtype"}


def training_arguments(json_path, output_dir, compute_dtype, has_eval):
    """TrainingArguments from the JSON file (an unknown key is an error; the script sets what it owns) and the
    file's own values (the run record keeps them: a resumed run is checked against them)."""
    file_values = read_json_object(json_path, "--train_args_json")
    values = dict(file_values)
    values.update(
        output_dir=str(output_dir),
        fp16=compute_dtype == torch.float16,
        bf16=compute_dtype == torch.bfloat16,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
    )
    if not has_eval:
        values["eval_strategy"] = "no"
    try:
        (args,) = HfArgumentParser(TrainingArguments).parse_dict(values)
    except ValueError as err:
        raise ConfigError(f"--train_args_json={json_path}: {err}") from err
    check_report_to(",".join(args.report_to), "train_qlora.py", f"--train_args_json={json_path}: report_to")
    return args, file_values


def main(config):
    json_output_dir = read_json_object(config["train_args_json"], "--train_args_json").get("output_dir")
    output_dir = Path(config["output_dir"] or json_output_dir or checkpoint_dir("", config["data_name"], "train_qlora"))
    # Before anything slow: a resumed run's own settings (its checkpoint's record), then the model folder, the data
    # files, the options (the JSON file too), then the output folder.
    resume = find_resume_checkpoint(output_dir, config["resume_from_checkpoint"])
    check_resume_matches(resume, config, "train_qlora.py")
    train_file, dev_file = check_training_start(config, "train_qlora.py", methods=("lora", "ptuning"))
    ptuning = config["method"] == "ptuning"
    device = resolve_device("auto")
    compute_dtype = resolve_dtype(config["dtype"], device)
    args, training_values = training_arguments(config["train_args_json"], output_dir, compute_dtype, dev_file is not None)
    run_folder = RunFolder(output_dir, resume, config["overwrite_output_dir"]).check()  # rank 0 holds it for all ranks
    quantization = kbit_quantization_config(config["quant_bits"], compute_dtype, ptuning=ptuning)
    set_seed(args.seed)  # the prefix encoder is initialised as the model loads
    model, tokenizer = load_model_and_tokenizer(config["model_dir"], dtype=compute_dtype, device=device, quantization_config=quantization,
                                                **(prefix_settings(config) if ptuning else {}))
    # Frozen base, unquantized weights kept in the compute dtype (no fp32 copies), non-reentrant checkpointing.
    model = prepare_kbit_model(model, compute_dtype, gradient_checkpointing=config["gradient_checkpointing"])
    if ptuning:  # no LoRA: the prefix encoder alone trains, in fp32
        train_prefix_only(model, config["model_dir"])
        print_trainable_parameters(model)
    else:
        set_seed(args.seed)  # the LoRA initialisation follows the JSON's seed
        model = add_lora(model, config["lora"])
        model.print_trainable_parameters()

    train_data, eval_data = load_datasets(train_file, dev_file, tokenizer, model.model_version, "instruction",
                                          config["max_source_length"], config["max_target_length"],
                                          skip_bad_lines=config["skip_bad_lines"], loss_on_all_turns=config["loss_on_all_turns"],
                                          show_example=config["show_example"])
    # Config, model and data are good: only now is an overwritten run moved aside (one process does it).
    if int(os.environ.get("RANK", "0")) == 0:
        run_folder.prepare()

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "runs"))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        trainable_only=ptuning,  # checkpoints hold the prefix, not the quantized base
        run_info={"script": "train_qlora.py", "config": config, "model_version": model.model_version,
                  "training_arguments": training_values},
    )
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    final_eval = trainer.evaluate() if eval_data is not None else {}  # every process takes part
    if trainer.is_world_process_zero():
        finish_trainer_run(trainer, result, final_eval, output_dir, started)


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__, renamed=RENAMED))

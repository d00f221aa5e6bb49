"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B with LoRA (or every weight), using the Hugging Face Trainer.

    python train_trainer.py                          # the shipped small model on the demo NER data (the defaults)
    python train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra --learning_rate=2e-4 --num_train_epochs=3
    python train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra --resume_from_checkpoint=auto
    python train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra --method=ptuning --pre_seq_len=128 --learning_rate=2e-2
    deepspeed train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra     # uses deepspeed.json
    deepspeed --num_gpus 2 train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra --method=full --deepspeed=deepspeed_zero3.json

The default learning rate and epoch count suit the small model; a 6B model wants about 2e-4 and 3 epochs.
--method=full trains every weight instead of LoRA adapters. Without DeepSpeed the weights are then kept in fp32 and
the compute runs in bf16/fp16 autocast; under DeepSpeed they are bf16/fp16 and DeepSpeed keeps the fp32 master copy
(a 6B model needs ZeRO-3 over several GPUs, or deepspeed_zero3_offload.json).

Reads data/<data_name>/instruct_data/{train,dev}.txt (made by process.py) and writes
checkpoint/<data_name>/train_trainer/:
    adapter_model/   the LoRA adapter in PEFT format + train_args.json
    prefix_model/    --method=ptuning: the P-tuning v2 prefix (official layout, safetensors) + train_args.json
    model/           --method=full or freeze: the fine-tuned model folder (official layout, loads as --model_dir) + train_args.json
    checkpoint-N/    Trainer checkpoints for --resume_from_checkpoint, with train_args.json (the run record: a resume
                     takes its settings and is checked against them)
    runs/            TensorBoard logs;  loss.png  the loss curve
"""
import os
import time

import utils.log_filters  # noqa: F401, I001  (before the libraries: bitsandbytes logs a known-harmless message on import)
import torch
import transformers
from transformers import TrainingArguments

from utils.config_utils import parse_config
from utils.dataset import PaddingCollator
from utils.distributed import leave_process_group, set_env_from_mpi
from utils.model_loading import load_model_and_tokenizer, resolve_device, resolve_dtype
from utils.train_utils import (
    Trainer,
    add_lora,
    check_method,
    check_training_start,
    checkpoint_dir,
    finish_trainer_run,
    freeze_all_but,
    gathered_state_dict,
    gathered_trainable_parameters,
    load_datasets,
    prepare_packing,
    prefix_settings,
    print_trainable_parameters,
    train_prefix_only,
)
from utils.run_dirs import RunFolder, find_resume_checkpoint
from utils.run_record import check_resume_matches

DEFAULTS = {
    "model_dir": "model_hub/chatglm2-small",  # the shipped small model; a 6B model: see README ("Run")
    "data_name": "demo_ner",
    "train_file": "",  # default: data/<data_name>/instruct_data/train.txt (text_data/ for data_format=text)
    "dev_file": "",  # default: data/<data_name>/instruct_data/dev.txt, text_data/ likewise, if it exists; none: no evaluation
    "output_dir": "",  # default: checkpoint/<data_name>/train_trainer
    "max_source_length": 256,
    "max_target_length": 128,
    "data_format": "instruction",  # instruction: {instruct, query, answer} records; text: {text} records for causal-LM training
    "block_size": 512,  # data_format=text: tokens per training block
    "skip_bad_lines": False,
    "loss_on_all_turns": False,  # multi-turn records: every history answer is learnt, not only the last answer
    # (ChatGLM3 conversation records always learn every assistant message without "loss": false)
    "show_example": False,  # print the first training sample: its tokens, ids and which of them are in the loss
    "method": "lora",  # lora: LoRA adapters on frozen weights; ptuning: a P-tuning v2 prefix on frozen weights; freeze: the last blocks; full: every weight
    "lora": {"r": 32, "alpha": 64, "dropout": 0.05, "target_modules": "all"},  # all: the four linear layers of a block
    # method=ptuning (THUDM's P-tuning v2): learnt keys and values of pre_seq_len positions in every layer; with
    # prefix_projection they come from a two-layer MLP. The official runs used pre_seq_len 128 and learning rate 2e-2.
    "pre_seq_len": 128,
    "prefix_projection": False,
    # method=freeze (freeze tuning): the last trainable_layers blocks train (a negative number: the first ones), within
    # them the parameters named by trainable_modules ("all", or e.g. "mlp,self_attention"), plus those outside the
    # blocks named by extra_modules (e.g. "final_layernorm,output_layer"). The run writes a whole model folder.
    "freeze": {"trainable_layers": 2, "trainable_modules": "all", "extra_modules": ""},
    "dtype": "auto",  # weights: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), fp32, fp16, bf16
    "num_train_epochs": 8.0,
    "max_steps": -1,  # > 0 overrides num_train_epochs
    "per_device_train_batch_size": 16,  # with packing: rows of packed samples (up to pack_tokens tokens each)
    # Packed training: several samples per row, each attending only to itself (positions restart per sample), the
    # loss normalised over the target tokens of the step as unpacked, so a packed run trains like the unpacked one on
    # fewer, fuller rows. per_device_train_batch_size then counts rows, not samples. Models that cannot pack train
    # unpacked in batches grouped by length (the log says so).
    "packing": False,
    # Tokens per packed row (the row budget: peak memory follows it and the rows per step, not the longest sample).
    # Measured on an H200 (ChatGLM2-6B LoRA r 8, MSRA, real tokens/s between log lines): one row of 2560 a step
    # 15,700 at 19.4 GiB; one of 3072 18,200 at 20.9 GiB; two of 2048 17,800 at 24.0 GiB; docs/benchmarks.md.
    "pack_tokens": 2560,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,  # for the small model; 6B models: about 2e-4
    "weight_decay": 0.0,
    "warmup_steps": 0.05,  # a fraction of the total steps if < 1
    "lr_scheduler_type": "linear",
    "max_grad_norm": 1.0,
    "gradient_checkpointing": False,
    "logging_steps": 10,
    "eval_steps": 100,
    "save_steps": 100,  # <= 0: no checkpoint-N folders (the final adapter / model is written all the same)
    "save_total_limit": 2,  # complete checkpoint-N folders kept (<= 0: all)
    "seed": 42,
    "resume_from_checkpoint": "",  # "auto" = the newest complete checkpoint-N in output_dir, or a path
    "overwrite_output_dir": False,  # replace a finished run (kept as <output_dir>.previous until this one has finished)
    "deepspeed": "",  # a DeepSpeed config file; under a launcher (deepspeed, torchrun, mpirun) defaults to deepspeed.json
    "local_rank": -1,  # set by the deepspeed launcher
    "report_to": "tensorboard",
}


def main(config):
    output_dir = checkpoint_dir(config["output_dir"], config["data_name"], "train_trainer")
    set_env_from_mpi()  # mpirun: ranks and rank 0's address from MPI, as the launchers set them
    launched = config["local_rank"] >= 0 or "RANK" in os.environ  # by deepspeed, torchrun or mpirun
    deepspeed_config = config["deepspeed"] or ("deepspeed.json" if launched else None)
    # Before anything slow: a resumed run's own settings (its checkpoint's record), then the model folder, the data
    # files, the options, then the output folder.
    resume = find_resume_checkpoint(output_dir, config["resume_from_checkpoint"])
    check_resume_matches(resume, config, "train_trainer.py")
    train_file, dev_file = check_training_start(config, "train_trainer.py")
    run_folder = RunFolder(output_dir, resume, config["overwrite_output_dir"]).check()  # rank 0 holds it for all ranks

    # Model: under DeepSpeed the engine places it; otherwise straight onto the GPU if there is one. The compute dtype
    # is chosen for the device that trains, also when the weights are loaded on the CPU first. The weights are in it
    # too, except for full fine-tuning without DeepSpeed: there they stay fp32 (the master copy the optimizer updates).
    method = check_method(config["method"])
    full, ptuning, freeze = method == "full", method == "ptuning", method == "freeze"
    training_device = resolve_device("auto")
    compute_dtype = resolve_dtype(config["dtype"], training_device)
    prefix = prefix_settings(config) if ptuning else {}
    transformers.set_seed(config["seed"])  # the prefix encoder is initialised as the model loads
    model, tokenizer = load_model_and_tokenizer(config["model_dir"], dtype=torch.float32 if full and not deepspeed_config else compute_dtype,
                                                device="cpu" if deepspeed_config else training_device, **prefix)
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    transformers.set_seed(config["seed"])  # the LoRA initialisation follows --seed
    if ptuning:
        train_prefix_only(model, config["model_dir"])  # in fp32 on a half-precision base, as officially
        print_trainable_parameters(model)
    elif freeze:
        freeze_all_but(model, **config["freeze"])
        if not deepspeed_config:  # the trained blocks in fp32 (the optimizer's master copy), compute in the half type
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        print_trainable_parameters(model)
    elif full:
        print_trainable_parameters(model)
    else:
        model = add_lora(model, config["lora"])
        model.print_trainable_parameters()

    train_data, eval_data = load_datasets(train_file, dev_file, tokenizer, model.model_version, config["data_format"], config["max_source_length"],
                                          config["max_target_length"], config["block_size"], config["skip_bad_lines"],
                                          config["loss_on_all_turns"], config["show_example"])
    train_data, group_by_length = prepare_packing(model, train_data, config["packing"], config["pack_tokens"], config["seed"])
    # Config, model and data are good: only now is an overwritten run moved aside (one process does it).
    if int(os.environ.get("RANK", "0")) == 0:
        run_folder.prepare()

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "runs"))
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=config["num_train_epochs"],
        max_steps=config["max_steps"],
        per_device_train_batch_size=config["per_device_train_batch_size"],
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        per_device_eval_batch_size=config["per_device_eval_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        learning_rate=config["learning_rate"],
        weight_decay=config["weight_decay"],
        warmup_steps=config["warmup_steps"],
        lr_scheduler_type=config["lr_scheduler_type"],
        max_grad_norm=config["max_grad_norm"],
        # Mixed precision: trained weights (LoRA, or all of them with --method=full) fp32, compute in the half type.
        fp16=compute_dtype == torch.float16,
        bf16=compute_dtype == torch.bfloat16,
        logging_steps=config["logging_steps"],
        logging_first_step=True,
        eval_strategy="steps" if eval_data is not None else "no",
        eval_steps=config["eval_steps"],
        save_strategy="steps" if config["save_steps"] > 0 else "no",
        save_steps=max(config["save_steps"], 1),
        save_total_limit=config["save_total_limit"],
        seed=config["seed"],
        deepspeed=deepspeed_config,
        report_to=[r for r in config["report_to"].split(",") if r and r != "none"],
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        trainable_only=ptuning or freeze,
        run_info={"script": "train_trainer.py", "config": config, "model_version": model.model_version},
    )
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    final_eval = trainer.evaluate() if eval_data is not None else {}  # every process takes part
    if full or freeze:  # every process takes part in gathering ZeRO-3 shards; the saved weights are in the compute dtype
        state = gathered_state_dict(trainer.model, keep=trainer.is_world_process_zero(), dtype=compute_dtype)
        if trainer.is_world_process_zero():
            finish_trainer_run(trainer, result, final_eval, output_dir, started, state)
    else:
        with gathered_trainable_parameters(trainer.model):  # ZeRO-3: whole LoRA weights for the save, gathered by all
            if trainer.is_world_process_zero():
                finish_trainer_run(trainer, result, final_eval, output_dir, started)
    leave_process_group()


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))

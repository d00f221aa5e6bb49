"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B with the Hugging Face Trainer: LoRA (the default), a
P-tuning v2 prefix, freeze tuning or every weight (--method).

    python train_trainer.py                # the shipped small model on the demo NER data (the defaults)
    python train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra --learning_rate=2e-4 --num_train_epochs=3
    python train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra --resume_from_checkpoint=auto
    python train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra --method=ptuning --learning_rate=2e-2
    deepspeed train_trainer.py --model_dir=model_hub/chatglm2-6b --data_name=msra     # uses deepspeed.json
    deepspeed --num_gpus 2 train_trainer.py ... --method=full --deepspeed=deepspeed_zero3.json

The default learning rate and epochs suit the small model; a 6B model wants about 2e-4 and 3 epochs. --method=full
keeps the weights in fp32 with bf16/fp16 autocast, or under DeepSpeed in bf16/fp16 with DeepSpeed's fp32 master copy
(a 6B model needs ZeRO-3 over several GPUs, or deepspeed_zero3_offload.json).

Reads data/<data_name>/instruct_data/{train,dev}.txt (made by process.py); writes checkpoint/<data_name>/train_trainer/:
adapter_model/ (LoRA, PEFT format), prefix_model/ (ptuning, official layout) or model/ (full, freeze: a model folder),
each with train_args.json; checkpoint-N/ for --resume_from_checkpoint (with the run record a resume is checked
against); runs/ (TensorBoard); loss.png.
"""
import os

import utils.log_filters  # noqa: F401, I001  (first: bitsandbytes logs a known-harmless message on import)
import torch

from utils.config_utils import parse_config
from utils.distributed import leave_process_group, set_env_from_mpi
from utils.model_loading import resolve_device, resolve_dtype
from utils.trainer import train_and_finish, training_arguments
from utils.training_methods import load_model_to_train
from utils.training_options import DEFAULTS, check_run_start, checkpoint_dir


def run_training(config):
    output_dir = checkpoint_dir(config["output_dir"], config["data_name"], "train_trainer")
    set_env_from_mpi()  # mpirun: ranks and rank 0's address from MPI, as the launchers set them
    launched = config["local_rank"] >= 0 or "RANK" in os.environ  # by deepspeed, torchrun or mpirun
    deepspeed_config = config["deepspeed"] or ("deepspeed.json" if launched else None)
    if deepspeed_config:
        # Before the process group exists: DeepSpeed's barrier takes the world group as a default argument when it is
        # imported, and would keep a group made earlier (and its threads) alive into the interpreter's shutdown.
        import deepspeed.comm  # noqa: F401
    resume, data_files = check_run_start(config, "train_trainer.py", output_dir)

    # Model: under DeepSpeed the engine places it; otherwise straight onto the GPU if there is one. The compute dtype
    # is chosen for the device that trains, also when the weights are loaded on the CPU first. The weights are in it
    # too, except for full fine-tuning without DeepSpeed: there they stay fp32 (the master copy the optimizer updates).
    method = config["method"]
    training_device = resolve_device("auto")
    compute_dtype = resolve_dtype(config["dtype"], training_device)
    weights_dtype = torch.float32 if method == "full" and not deepspeed_config else compute_dtype
    model, tokenizer = load_model_to_train(config, weights_dtype, "cpu" if deepspeed_config else training_device,
                                           master_fp32=not deepspeed_config)
    # After the model has loaded: TrainingArguments with a ZeRO-3 config would make from_pretrained partition it.
    args = training_arguments(config, output_dir, compute_dtype, data_files[1] is not None, deepspeed_config)
    train_and_finish(config, {"script": "train_trainer.py"}, model, tokenizer, data_files, args, resume, compute_dtype)


def main(config):
    run_training(config)
    leave_process_group()  # once the run's model and engine are gone: the process groups they hold end with them


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))

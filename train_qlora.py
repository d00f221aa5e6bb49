"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B on a quantized base (QLoRA): the base weights in bitsandbytes
NF4 with double quantization (--quant_bits=4, the default) or LLM.int8 (--quant_bits=8), frozen; trained on top of
them with the Hugging Face Trainer, either LoRA adapters on every linear layer (--method=lora, the default) or
THUDM's P-tuning v2 prefix (--method=ptuning: only the prefix encoder trains, in fp32, as in train_trainer.py).
Both bit widths also run on CPU (bitsandbytes' CPU backend), slowly.

    python train_qlora.py --train_args_json chatGLM_6B_QLoRA.json --model_dir model_hub/chatglm2-6b \\
        --train_file data/msra/instruct_data/train.txt --dev_file data/msra/instruct_data/dev.txt \\
        --lora_r 8 --lora_dropout 0.05 --dtype bf16
    python train_qlora.py --model_dir model_hub/chatglm2-6b --data_name msra --learning_rate 2e-4 --max_steps 1000
    python train_qlora.py --data_name msra --resume_from_checkpoint auto
    python train_qlora.py --train_args_json my_ptuning.json --model_dir model_hub/chatglm2-6b --data_name msra \\
        --method ptuning --pre_seq_len 128 --quant_bits 8     # the JSON with learning_rate 2e-2, as officially

The options and their defaults are train_trainer.py's (--learning_rate, --max_steps, --seed, --lora_r, ...). The
JSON file, if given, holds TrainingArguments (steps, batch size, learning rate, optimizer, ...): its values come
between those defaults and the command line. Writes checkpoint/<data_name>/train_qlora/ (unless the JSON or
--output_dir names a folder): adapter_model/ (PEFT adapter + train_args.json) or, with --method=ptuning,
prefix_model/ (the prefix in the official layout, as train_trainer.py writes it, + train_args.json; it goes on the
unquantized base by --lora_path), checkpoint-N/ for resuming (with ptuning: the prefix only; each with
train_args.json, whose settings a resume takes), runs/ (TensorBoard), loss.png.
"""
import utils.log_filters  # noqa: F401, I001  (before the libraries: bitsandbytes logs a known-harmless message on import)
from transformers import set_seed

from utils.config_utils import parse_config
from utils.model_utils import load_model_and_tokenizer, resolve_device, resolve_dtype
from utils.trainer import train_and_finish, training_arguments
from utils.training_methods import kbit_quantization_config, prefix_settings, prepare_kbit_model, setup_method
from utils.training_options import DEFAULTS as SHARED_DEFAULTS
from utils.training_options import check_run_start, checkpoint_dir, layer_train_args_json

DEFAULTS = {
    **SHARED_DEFAULTS,  # train_trainer.py's options; method: lora or ptuning (both on the frozen quantized base)
    "train_args_json": "",  # a JSON file of TrainingArguments, between the defaults and the command line
    "quant_bits": 4,  # the base: 4 = bitsandbytes NF4 with double quantization (QLoRA), 8 = bitsandbytes LLM.int8
}
# The names this script had before the training scripts shared one vocabulary (accepted for one more release).
RENAMED = {"train_data_path": "train_file", "eval_data_path": "dev_file", "lora_rank": "lora_r", "compute_dtype": "dtype"}


def main(config):
    extra_training_arguments, file_values = layer_train_args_json(config)
    output_dir = checkpoint_dir(config["output_dir"], config["data_name"], "train_qlora")
    resume, data_files = check_run_start(config, "train_qlora.py", output_dir, methods=("lora", "ptuning"))
    compute_dtype = resolve_dtype(config["dtype"], resolve_device("auto"))
    args = training_arguments(config, output_dir, compute_dtype, data_files[1] is not None, config["deepspeed"] or None,
                              extra_training_arguments, source=f"--train_args_json={config['train_args_json']}")
    ptuning = config["method"] == "ptuning"
    quantization = kbit_quantization_config(config["quant_bits"], compute_dtype, ptuning=ptuning)
    set_seed(config["seed"])  # the prefix encoder is initialised as the model loads
    model, tokenizer = load_model_and_tokenizer(config["model_dir"], dtype=compute_dtype, device=resolve_device("auto"),
                                                quantization_config=quantization, **(prefix_settings(config) if ptuning else {}))
    # Frozen base, unquantized weights kept in the compute dtype (no fp32 copies), non-reentrant checkpointing.
    model = prepare_kbit_model(model, compute_dtype, gradient_checkpointing=config["gradient_checkpointing"])
    set_seed(config["seed"])  # the LoRA initialisation follows --seed
    model = setup_method(model, config, config["method"])  # ptuning: the prefix encoder alone trains, in fp32
    run_info = {"script": "train_qlora.py", "training_arguments": file_values}
    train_and_finish(config, run_info, model, tokenizer, data_files, args, resume, compute_dtype)


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__, renamed=RENAMED))

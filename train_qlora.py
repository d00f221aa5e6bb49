"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B on a frozen quantized base (QLoRA): bitsandbytes NF4 with double
quantization (--quant_bits=4) or LLM.int8 (8), also on CPU (slowly); trained on top with the Hugging Face Trainer, LoRA
adapters (--method=lora) or THUDM's P-tuning v2 prefix (--method=ptuning, the prefix encoder alone, in fp32).

    python train_qlora.py --train_args_json chatGLM_6B_QLoRA.json --model_dir model_hub/chatglm2-6b \\
        --train_file data/msra/instruct_data/train.txt --dev_file data/msra/instruct_data/dev.txt \\
        --lora_r 8 --dtype bf16
    python train_qlora.py --model_dir model_hub/chatglm2-6b --data_name msra --learning_rate 2e-4 --max_steps 1000
    python train_qlora.py --data_name msra --resume_from_checkpoint auto
    python train_qlora.py --model_dir model_hub/chatglm2-6b --data_name msra --method ptuning --learning_rate 2e-2

The options and defaults are train_trainer.py's; a --train_args_json file of TrainingArguments (steps, learning rate,
optimizer, ...) comes between the defaults and the command line. Writes checkpoint/<data_name>/train_qlora/ (or the
JSON's or --output_dir's folder): adapter_model/ or prefix_model/ (the prefix goes on the unquantized base by
--lora_path), each with train_args.json; checkpoint-N/ for resuming; runs/ (TensorBoard); loss.png.
"""
import utils.log_filters  # noqa: F401, I001  (first: bitsandbytes logs a known-harmless message on import)

from utils.config_utils import parse_config
from utils.model_loading import resolve_device, resolve_dtype
from utils.trainer import train_and_finish, training_arguments
from utils.training_methods import kbit_quantization_config, load_model_to_train
from utils.training_options import DEFAULTS as SHARED_DEFAULTS
from utils.training_options import check_run_start, checkpoint_dir, layer_train_args_json

DEFAULTS = {
    **SHARED_DEFAULTS,  # train_trainer.py's options; method: lora or ptuning (both on the frozen quantized base)
    "train_args_json": "",  # a JSON file of TrainingArguments, between the defaults and the command line
    "quant_bits": 4,  # the base: 4 = bitsandbytes NF4 with double quantization (QLoRA), 8 = bitsandbytes LLM.int8
}
# The names this script had before the training scripts shared one vocabulary (accepted for one more release).
RENAMED = {"train_data_path": "train_file", "eval_data_path": "dev_file", "lora_rank": "lora_r",
           "compute_dtype": "dtype"}


def main(config):
    extra_training_arguments, file_values = layer_train_args_json(config)
    output_dir = checkpoint_dir(config["output_dir"], config["data_name"], "train_qlora")
    resume, data_files = check_run_start(config, "train_qlora.py", output_dir, methods=("lora", "ptuning"))
    compute_dtype = resolve_dtype(config["dtype"], resolve_device("auto"))
    args = training_arguments(config, output_dir, compute_dtype, data_files[1] is not None, config["deepspeed"] or None,
                              extra_training_arguments, source=f"--train_args_json={config['train_args_json']}")
    ptuning = config["method"] == "ptuning"
    quantization = kbit_quantization_config(config["quant_bits"], compute_dtype, ptuning=ptuning)
    # Frozen base, unquantized weights kept in the compute dtype (no fp32 copies), non-reentrant checkpointing;
    # ptuning: the prefix encoder alone trains, in fp32.
    model, tokenizer = load_model_to_train(config, compute_dtype, resolve_device("auto"), quantization_config=quantization)
    run_info = {"script": "train_qlora.py", "training_arguments": file_values}
    train_and_finish(config, run_info, model, tokenizer, data_files, args, resume, compute_dtype)


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__, renamed=RENAMED))

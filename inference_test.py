"""How fast a model answers: prefill and decode tokens/s, time to first token, peak memory.

    python inference_test.py --model_dir=model_hub/chatglm2-6b --lora_path=checkpoint/msra/train_trainer/adapter_model
    python inference_test.py --model_dir=model_hub/chatglm2-6b,model_hub/chatglm2-6b-ner-int4 --json=speed.json

Each model folder in --model_dir gets a row; with --lora_path the first one also gets a row with the adapter (folded
in, as the other scripts decode; --fold_adapter=false: PEFT's layers) or the P-tuning prefix. Greedy decoding of
exactly max_new_tokens tokens on a batch of identical prompts of about prompt_len tokens, after a warm-up run.
"""
import json
from pathlib import Path

import utils.log_filters  # noqa: F401, I001  (before the libraries: bitsandbytes logs a known-harmless message on import)
import torch

from utils.adapters import (TrainedPath, check_lora_on_base, check_model_dir, load_trained, put_on_base,
                            take_run_settings)
from utils.config_utils import ConfigError, parse_config
from utils.data_io import write_atomic
from utils.generation import peak_memory_gib, time_generation
from utils.model_loading import load_model_and_tokenizer
from utils.prompts import fit_prompt, get_prompt_format
from utils.serving import GENERATION_DEFAULTS

DEFAULTS = {
    "model_dir": "model_hub/chatglm2-small",  # comma-separated model folders; with --lora_path, default: the run's base
    "lora_path": "",
    "batch_size": 1,
    "prompt_len": 32,
    "max_new_tokens": 256,
    "repeats": 1,  # timed runs per row (the best is reported), after one warm-up
    **{key: GENERATION_DEFAULTS[key] for key in ("dtype", "device", "decode")},
    "fold_adapter": True,  # the adapter added into the weights, as the other scripts decode; false: PEFT's layers
    "json": "",  # also write the rows here
}
PROMPT_TEXT = "请介绍一下清华大学的历史、学科设置和它在中国高等教育中的地位，并谈谈它对科学研究的贡献。" * 20
COLUMNS = ("model", "batch_size", "prompt_len", "new_tokens", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s",
           "peak_memory_gib")


def benchmark(name, model, input_ids, config):
    device, new_tokens = input_ids.device, config["max_new_tokens"]
    # Full-length warm-up (and, for decode=compiled, the compilation): a short one left the first run of a process slow.
    time_generation(model, input_ids, new_tokens, config["decode"])
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = [time_generation(model, input_ids, new_tokens, config["decode"]) for _ in range(config["repeats"])]
    ttft, total = min(runs, key=lambda run: run[1])
    batch, prompt_len = input_ids.shape
    return {
        "model": name, "batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "ttft_ms": round(ttft * 1e3, 1), "prefill_tokens_per_s": round(batch * prompt_len / ttft, 1),
        "decode_tokens_per_s": round(batch * (new_tokens - 1) / (total - ttft), 1) if total > ttft else None,
        "peak_memory_gib": peak_memory_gib(device),
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
    }


def model_rows(model_path, trained, config):
    """The rows of one model folder: the model, then with `trained` (an adapter or prefix) on it."""
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=config["dtype"], device=config["device"])
    bits = getattr(model.config, "quantization_bit", 0)
    label = Path(model_path).name + (f" (int{bits})" if bits else f" ({str(model.dtype).removeprefix('torch.')})")
    try:
        prompt = fit_prompt(get_prompt_format(tokenizer, model.model_version), PROMPT_TEXT, [], config["prompt_len"])[0]
    except ValueError as err:  # the prompt template alone is longer
        raise ConfigError(f"--prompt_len={config['prompt_len']}: too short for {model_path}'s prompt template "
                          f"({err})") from err
    input_ids = torch.tensor([prompt] * config["batch_size"], device=model.device)
    rows = [benchmark(label, model, input_ids, config)]
    if trained.kind == "prefix":
        del model  # the base rebuilt with the prefix's positions
        model, _ = load_trained(model_path, trained, dtype=config["dtype"], device=config["device"])
        rows.append(benchmark(label + " + P-tuning prefix", model, input_ids, config))
    elif trained.kind == "adapter":
        model = put_on_base(model, trained, fold=config["fold_adapter"])
        suffix = " + adapter" if config["fold_adapter"] else " + adapter (PEFT layers)"
        rows.append(benchmark(label + suffix, model, input_ids, config))
    return rows


def main(config):
    trained = take_run_settings(config)
    # Every folder, and the adapter on the first model, checked before anything is loaded or timed.
    model_paths = [p for p in config["model_dir"].split(",") if p]
    if not model_paths:
        raise ConfigError("--model_dir: empty; give one or more model folders, comma-separated")
    for model_path in model_paths:
        check_model_dir(model_path)
    check_lora_on_base(trained, model_paths[0])
    rows = []
    for index, model_path in enumerate(model_paths):
        rows += model_rows(model_path, trained if index == 0 else TrainedPath("none"), config)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"# {rows[0]['device']}, torch {torch.__version__}")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    if config["json"]:
        write_atomic(config["json"], json.dumps(rows, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__, renamed={"model_path": "model_dir"}))

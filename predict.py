"""Batch prediction over a dev file with a base model + LoRA adapter (or a merged model), with metrics.

    python predict.py                                             # demo: the adapter train_trainer.py just wrote
    python predict.py --model_dir=model_hub/chatglm2-6b --data_name=msra --before_after
    python predict.py --model_dir=model_hub/chatglm2-6b-ner-merged --lora_path=none --dev_file=data/msra/instruct_data/dev.txt

Writes predictions.jsonl ({"input", "reference", "prediction"} per line) and metrics.json into the folder of the run
scored (<run>/predict-checkpoint-N for a checkpoint-N); for a base model alone checkpoint/<data_name>/base/
(--output_dir sets another). Metrics: NER entity-level precision, recall and F1, micro and per type (predicted entities
that the sentence does not contain are dropped and counted); generation BLEU-4 and ROUGE-1/2/L on characters.
--before_after also runs the base model without the adapter, so the gain is visible.
"""
import json
import time
from pathlib import Path

from utils.adapters import (adapter_disabled, check_lora_on_base, choose_lora_path, fold_adapter, load_run,
                            take_run_settings, uses_adapter)
from utils.config_utils import ConfigError, parse_config
from utils.data_io import BadLines, write_atomic, write_jsonl
from utils.decode_utils import entities_in_text, parse_ner_answer
from utils.generation import generate_answers
from utils.metrics import format_ner_report, generation_metrics, ner_metrics
from utils.prompts import get_prompt_format, source_text, user_message
from utils.records import read_instruction_records
from utils.run_dirs import checkpoint_step
from utils.serving import GENERATION_DEFAULTS, RUN_CHOICE_DEFAULTS, check_serving_options

DEFAULTS = {
    **RUN_CHOICE_DEFAULTS,
    "dev_file": "",  # default: data/<data_name>/instruct_data/dev.txt
    "output_dir": "",  # default: the scored run's folder, or checkpoint/<data_name>/base for a base model alone
    "task": "auto",  # ner, generation, or auto (ner when every reference is an entity_type list or 没有)
    "num_samples": 0,  # 0 = the whole file
    **GENERATION_DEFAULTS,  # max_input_tokens: a longer prompt loses its history, then the end of its text
    "batch_size": 8,
    "before_after": False,
    "drop_entities_not_in_text": "auto",  # NER scoring drops predicted entities that the sentence does not contain
    # (made up, not extracted); the report also gives the scores with them. auto = true for NER; true, false
    "skip_bad_lines": False,
}


RUN_KEYS = ("model_dir", "data_name", "max_input_tokens")  # what a run's train_args.json gives unless set here
RENAMED = {"max_source_length": "max_input_tokens"}  # the old name works until the next release, with a note


def default_output_dir(config, run_folder):
    """Where the results of `run_folder` go: its run's folder (<run>/predict-checkpoint-N for a checkpoint-N); for a
    base model alone (None) checkpoint/<data_name>/base, said on one line, and refused where a run was written there."""
    if run_folder is not None:
        return run_folder.parent / (f"predict-{run_folder.name}" if checkpoint_step(run_folder) is not None else "")
    output_dir = Path("checkpoint") / config["data_name"] / "base"
    runs = [*output_dir.glob("*/train_args.json"), *output_dir.glob("checkpoint-*")]
    if runs:
        raise ConfigError(f"--output_dir: the default for a base model alone, {output_dir}, holds a training run "
                          f"({runs[0]}); pass --output_dir for the results of {config['model_dir']}")
    print(f"results of the base model {config['model_dir']} alone go to {output_dir} (--output_dir sets another)", flush=True)
    return output_dir


def report(task, metrics):
    if task == "ner":
        return format_ner_report(metrics)
    return "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def headline(task, metrics):
    return ("f1", metrics["micro"]["f1"]) if task == "ner" else ("bleu-4", metrics["bleu-4"])


def main(config):
    check_serving_options(config, at_least_one=("batch_size",))
    lora_path = choose_lora_path(config)
    use_adapter = uses_adapter(lora_path)
    # The run's base, data set and lengths, and what --lora_path names checked against the base, before any data or
    # weights are read.
    trained = take_run_settings(config, RUN_KEYS)
    check_lora_on_base(trained, config["model_dir"])
    data_dir = Path("data") / config["data_name"] / "instruct_data"
    dev_file = Path(config["dev_file"] or data_dir / "dev.txt")
    output_dir = Path(config["output_dir"]) if config["output_dir"] else default_output_dir(config, trained.path)

    bad_lines = BadLines(skip=config["skip_bad_lines"])
    records = read_instruction_records(dev_file, bad_lines)
    if bad_lines.count:
        print(bad_lines.summary())
    if config["num_samples"] > 0:
        records = records[: config["num_samples"]]
    references = [r["answer"] for r in records]
    task = config["task"]
    if task == "auto":
        task = "ner" if all(not parse_ner_answer(a).malformed for a in references) else "generation"

    drop_made_up = {"auto": task == "ner", "true": True, "false": False}.get(str(config["drop_entities_not_in_text"]).lower())
    if drop_made_up is None or (drop_made_up and task != "ner"):
        raise ConfigError(f"--drop_entities_not_in_text={config['drop_entities_not_in_text']}: use auto, or true/false for NER (the entities of a generation task are not checked against a sentence)")
    sources = [source_text(r) for r in records] if drop_made_up else None  # the sentence, not the instruction

    # The adapter is folded into the weights for generation (base speed); with --before_after only after the base has
    # been scored with the adapter disabled, as folding changes the base weights.
    before_after = config["before_after"] and use_adapter
    model, tokenizer = load_run(config, fold=not before_after, trained=trained)
    version = model.model_version
    prompt_format = get_prompt_format(tokenizer, version)
    generation = dict(max_source_length=config["max_input_tokens"], max_new_tokens=config["max_new_tokens"],
                      batch_size=config["batch_size"], do_sample=config["do_sample"], decode=config["decode"], show_progress=True)
    if config["do_sample"]:
        generation.update(temperature=config["temperature"], top_p=config["top_p"], top_k=config["top_k"])

    def evaluate(name):
        started = time.time()
        predictions = generate_answers(model, tokenizer, prompt_format, records, **generation)
        metrics = (ner_metrics(predictions, references, sources) if task == "ner"
                   else generation_metrics(predictions, references))
        metrics["seconds"] = round(time.time() - started, 1)
        print(f"\n[{name}] {len(records)} samples from {dev_file} in {metrics['seconds']} s\n{report(task, metrics)}")
        return {"predictions": predictions, "metrics": metrics}

    main_name = "adapter" if use_adapter else "model"
    results = {}
    if before_after:
        with adapter_disabled(model):
            results["base"] = evaluate("base")
        model = fold_adapter(model)
    results[main_name] = evaluate(main_name)

    def made_up(prediction, source):  # the entities scoring dropped, as entity_type lines
        entities = parse_ner_answer(prediction).entities
        return sorted(f"{e}_{t}" for e, t in entities - entities_in_text(entities, source))

    write_jsonl(output_dir / "predictions.jsonl", [
        {"input": user_message(r), "reference": r["answer"], "prediction": p,
         **({"not_in_text": made_up(p, source)} if drop_made_up else {}), **({"base_prediction": b} if "base" in results else {})}
        for r, source, p, b in zip(records, sources or [None] * len(records), results[main_name]["predictions"],
                                   results.get("base", results[main_name])["predictions"])
    ])
    summary = {"task": task, "drop_entities_not_in_text": drop_made_up, "dev_file": str(dev_file), "model_dir": config["model_dir"],
               "lora_path": lora_path if use_adapter else None, "max_source_length": config["max_input_tokens"],
               **{name: result["metrics"] for name, result in results.items()}}
    write_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2, ensure_ascii=False))
    if "base" in results:
        label, before = headline(task, results["base"]["metrics"])
        _, after = headline(task, results[main_name]["metrics"])
        print(f"\n{label}: before tuning {before:.4f} -> after tuning {after:.4f} ({after - before:+.4f})")
    print(f"predictions: {output_dir / 'predictions.jsonl'}\nmetrics: {output_dir / 'metrics.json'}")


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__, renamed=RENAMED))

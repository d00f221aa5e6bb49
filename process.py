"""Convert raw data into instruction data: data/<data_name>/instruct_data/{train,dev}.txt, one JSON object a line,
{"instruct", "query", "answer"} (+ "history" for multi-turn conversations), or for conversations with tool calls a
ChatGLM3 conversation record {"conversations": [...]} (utils/chat_data.py). Run from the repository root.

    python process.py                      # the demo: data/demo_ner/raw/{train,dev}.json -> data/demo_ner/instruct_data
    python process.py --data_name msra \\
        --train_file ../shared/data/msra/bio/val_sentences.txt,../shared/data/msra/ori_data/msra_1000.txt \\
        --dev_file ../shared/data/msra/bio/test.txt
    python process.py --data_name adgen --train_file ../shared/data/adgen/dev_content_summary.json \\
        --dev_file "" --dev_ratio 0.1

train_file and dev_file take comma-separated files, each file's format detected from its name and content (see
utils/ner_data.py) unless --input_format names one for all. For NER the answer is one `实体_类型` line per distinct
entity, or 没有. Bad input stops with the file, line and field (--skip_bad_lines skips and counts such lines). Existing
output files are kept unless --overwrite, which also removes a dev.txt that the new run does not produce.
"""
import difflib
import json
import random
import sys
from collections import Counter
from pathlib import Path

from utils import ner_data
from utils.config_utils import ConfigError, parse_config
from utils.data_io import BadLines, special_file_kind, write_jsonl

DEFAULTS = {
    "data_name": "demo_ner",
    "train_file": "data/demo_ner/raw/train.json",  # comma-separated list of files
    "dev_file": "data/demo_ner/raw/dev.json",  # "" for none
    "input_format": "auto",  # auto, or one of utils.ner_data.FORMATS for every file
    "output_dir": "",  # "" = data/<data_name>/instruct_data
    "dev_ratio": 0.0,  # > 0 and no dev_file: this fraction of train becomes dev (shuffled with seed)
    "seed": 42,
    "augment_copies": 0,  # NER only: > 0 adds this many copies of each train example with its entities swapped for
    # other train entities of the same type (mention replacement; utils/ner_data.replace_mentions), shuffled in
    "max_text_chars": 0,  # NER only: > 0 cuts longer texts there and drops the entities past the cut
    "skip_bad_lines": False,
    "strict_tags": False,  # an I- tag that does not continue an entity of its type is an error, not a new entity
    "overwrite": False,
    "debug": False,  # errors show their Python traceback
}


def prompt_key(record):
    """What a sample asks: instruct and query, or a conversation's messages before its last answer."""
    if "conversations" in record:
        return json.dumps(record["conversations"][:-1], ensure_ascii=False, sort_keys=True)
    return record["instruct"], record["query"]


def check_options(config):
    """The options and the output files, before any reading: returns (train files, dev files, {split: output})."""
    if config["input_format"] != "auto" and config["input_format"] not in ner_data.FORMATS:
        close = difflib.get_close_matches(config["input_format"], ner_data.FORMATS, n=1, cutoff=0.6)
        raise ConfigError(f"--input_format: {config['input_format']!r} is no format; auto or one of "
                          f"{', '.join(ner_data.FORMATS)}" + (f" (did you mean {close[0]}?)" if close else ""))
    if config["train_file"] != DEFAULTS["train_file"] and config["dev_file"] == DEFAULTS["dev_file"]:
        raise ConfigError("--dev_file: --train_file is set but --dev_file is still the demo's; pass --dev_file PATH, "
                          "or --dev_file \"\" (no dev set, or one split off with --dev_ratio)")
    if not 0.0 <= config["dev_ratio"] < 1.0:
        raise ConfigError(f"--dev_ratio: {config['dev_ratio']} is out of range; a fraction in [0, 1)")
    if config["dev_ratio"] > 0 and config["dev_file"]:
        raise ConfigError("--dev_ratio: splits dev off train when there is no --dev_file; give one or the other")
    for key in ("augment_copies", "max_text_chars"):
        if config[key] < 0:
            raise ConfigError(f"--{key}: {config[key]} is negative; 0 (off) or more")
    train_files, dev_files = ([f.strip() for f in config[key].split(",") if f.strip()]
                              for key in ("train_file", "dev_file"))
    if not train_files:
        raise ConfigError("--train_file: empty; one or more files, comma-separated")
    output_dir = Path(config["output_dir"] or Path("data") / config["data_name"] / "instruct_data")
    outputs = {"train": output_dir / "train.txt", "dev": output_dir / "dev.txt"}
    # Refused before any reading rather than failing on write: a file where a folder of output_dir should be, and a
    # folder (or anything else) where an output file should be.
    folder = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not folder.is_dir():
        kind = "a file" if folder.is_file() else special_file_kind(folder)
        raise ConfigError(f"--output_dir: {folder} is {kind}, not a folder; choose another")
    for path in outputs.values():
        if path.exists() and not path.is_file():
            sys.exit(f"error: {path} exists and is not a file; remove it or choose another --output_dir")
    existing = [str(p) for p in outputs.values() if p.is_file() and p.stat().st_size > 0]
    if existing and not config["overwrite"]:
        sys.exit(f"error: {', '.join(existing)} already exist(s); pass --overwrite to replace, or choose --output_dir")
    return train_files, dev_files, outputs


def read_files(config, train_files, dev_files, bad_lines):
    """{split: items} (NER: (input_format, text, raw entities); generation: records), the kind (ner or generation)
    and the input formats seen."""
    items = {"train": [], "dev": []}
    kinds, formats = set(), set()
    for split, files in (("train", train_files), ("dev", dev_files)):
        for file in files:
            input_format = ner_data.detect_format(file) if config["input_format"] == "auto" else config["input_format"]
            kind = "ner" if input_format in ner_data.NER_FORMATS else "generation"
            kinds.add(kind)
            formats.add(input_format)
            before = len(items[split])
            for line, *item in ner_data.READERS[input_format](file, bad_lines[split]):
                items[split].append((input_format, *item) if kind == "ner" else item[0])
            print(f"{split}: {file} ({input_format}): {len(items[split]) - before} samples")
    if len(kinds) > 1:
        sys.exit("error: the files mix NER and generation formats; convert them in separate runs")
    return items, kinds.pop(), formats


def split_dev(items, dev_ratio, seed):
    """--dev_ratio: that fraction of train, shuffled with the seed, becomes dev."""
    order = list(range(len(items["train"])))
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(len(order) * dev_ratio)) if len(order) > 1 else 0
    dev_index = set(order[:n_dev])
    items["dev"] = [item for i, item in enumerate(items["train"]) if i in dev_index]
    items["train"] = [item for i, item in enumerate(items["train"]) if i not in dev_index]
    print(f"dev: {n_dev} samples split off train (dev_ratio={dev_ratio}, seed={seed})")


def ner_records(config, items, formats, stats):
    """The instruction records of the NER items, one instruct for all: types mapped, long texts cut, train augmented.
    Counts into stats (entity counts, truncated, dropped; each per split)."""
    entity_counts, truncated, dropped = stats
    unmapped = Counter()
    raw_types_of = {}  # type name -> the raw types written as it
    examples = {"train": [], "dev": []}  # (text, entities with type names)
    for split in ("train", "dev"):
        for input_format, text, entities in items[split]:
            mapped, raw_kept = ner_data.map_types(entities, input_format)
            unmapped.update(raw_kept)
            for (_, raw_type, _), (_, name, _) in zip(entities, mapped):
                raw_types_of.setdefault(name, set()).add(raw_type)
            cut, mapped, n_dropped = ner_data.truncate(text, mapped, config["max_text_chars"])
            truncated[split] += len(cut) < len(text)
            dropped[split] += n_dropped
            examples[split].append((cut, mapped))
    if config["augment_copies"] > 0:
        augmented, left_out = ner_data.replace_mentions(examples["train"], config["augment_copies"], config["seed"])
        examples["train"] += augmented
        random.Random(config["seed"]).shuffle(examples["train"])
        print(f"train: {len(augmented)} examples added by mention replacement ({config['augment_copies']} per example "
              f"with entities; {left_out} examples with overlapping or unplaced entities not augmented)")
    for split in ("train", "dev"):  # after augmentation: the counts describe the samples written
        for _, mapped in examples[split]:
            entity_counts[split].update(name for _, name in dict.fromkeys((e, name) for e, name, _ in mapped))
    type_names = [name for split in ("train", "dev") for _, mapped in examples[split] for _, name, _ in mapped]
    instruct = ner_data.choose_instruct(type_names, formats)
    print(f"instruct: {instruct}")
    if unmapped:
        print("types kept as raw names (no mapping): " + ", ".join(f"{t} {n}" for t, n in unmapped.most_common()))
    if merged := {name: raw for name, raw in raw_types_of.items() if len(raw) > 1}:
        # Not silent: scores per type then count these raw types as one.
        print("types written under one name: "
              + "; ".join(f"{name} <- {', '.join(sorted(raw))}" for name, raw in merged.items()))
    return {split: [ner_data.ner_record(text, mapped, instruct) for text, mapped in examples[split]]
            for split in ("train", "dev")}


def report(kind, records, bad_lines, stats, no_dev):
    """What each split holds. stats: (entity counts, truncated, dropped), each per split."""
    entity_counts, truncated, dropped = stats
    for split in ("train", "dev"):
        if not records[split] and split == "dev" and no_dev:
            print("dev: none (no --dev_file, --dev_ratio 0)")
            continue
        print(f"{split}: {len(records[split])} samples")
        if kind == "ner":
            by_type = entity_counts[split].most_common()
            print("  entities by type: " + (", ".join(f"{t} {n}" for t, n in by_type) or "none"))
            empty = sum(r["answer"] == ner_data.NO_ENTITY for r in records[split])
            print(f"  empty answers ({ner_data.NO_ENTITY}): {empty}")
            print(f"  truncated texts: {truncated[split]} (entities dropped: {dropped[split]})")
        else:
            print(f"  with history: {sum('history' in r for r in records[split])}")
            if conversations := sum("conversations" in r for r in records[split]):
                print("  conversation records (tool calls, unlearnt turns, ChatGLM3-format conversations): "
                      f"{conversations}")
        print("  " + bad_lines[split].summary().replace("\n", "\n  "))
    if any(bad_lines[split].repaired.total for split in ("train", "dev")):
        print("repaired: an I- tag that does not continue an entity of its type opens a new entity, as conlleval and "
              "seqeval read it; --strict_tags stops on such tags instead")
    if records["dev"]:
        train_prompts = {prompt_key(r) for r in records["train"]}
        print(f"dev samples whose instruct and query (or conversation) also occur in train: "
              f"{sum(prompt_key(r) in train_prompts for r in records['dev'])}")


def write(records, outputs, debug):
    """Train first: a stale dev.txt is removed only once the new train.txt is in place."""
    if not records["train"]:
        sys.exit("error: no training samples")
    for split in ("train", "dev"):
        try:
            if records[split]:
                write_jsonl(outputs[split], records[split])
                print(f"wrote {outputs[split]} ({len(records[split])} lines)")
            elif outputs[split].is_file():  # from an earlier run (--overwrite, or empty): not to pass for this run's
                outputs[split].unlink()
                print(f"removed {outputs[split]}: left from an earlier run, and this run has no {split} samples")
        except OSError as err:
            if debug:  # the traceback; else one line and exit status 1
                raise
            sys.exit(f"error: cannot {'write' if records[split] else 'remove'} {outputs[split]} ({err})")


def main(config):
    train_files, dev_files, outputs = check_options(config)
    bad_lines = {split: BadLines(config["skip_bad_lines"], config["strict_tags"]) for split in ("train", "dev")}
    items, kind, formats = read_files(config, train_files, dev_files, bad_lines)
    if config["dev_ratio"] > 0:
        split_dev(items, config["dev_ratio"], config["seed"])
    # distinct (entity, type) per sample, as in the answers; texts cut and the entities dropped with them
    stats = {"train": Counter(), "dev": Counter()}, Counter(), Counter()
    records = ner_records(config, items, formats, stats) if kind == "ner" else items
    report(kind, records, bad_lines, stats, no_dev=not dev_files and not config["dev_ratio"])
    write(records, outputs, config["debug"])


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))

"""Merge a LoRA adapter into its ChatGLM base model (or put a P-tuning v2 prefix beside its weights), optionally
quantize to int8 / int4, and write one model folder that loads anywhere with transformers + torch alone (AutoModel /
AutoTokenizer with trust_remote_code=True). A GLM-4 (or other transformers-native) base is merged too, into a folder
of its own layout (--quant_bits 0 only: int8/int4 here is ChatGLM's quantization).

    python merge_lora_and_quantize.py --lora_path checkpoint/demo_ner/train_trainer/adapter_model --output_dir model_hub/chatglm2-6b-ner --quant_bits 0
    python merge_lora_and_quantize.py --lora_path checkpoint/demo_ner/train_trainer/adapter_model --output_dir model_hub/chatglm2-6b-ner-int4 --quant_bits 4
    python merge_lora_and_quantize.py --lora_path checkpoint/msra/train_trainer/adapter_model --model_dir model_hub/chatglm3-6b --output_dir model_hub/chatglm3-6b-msra-int8 --quant_bits 8 --dtype bf16 --max_shard_size 1GB
    python merge_lora_and_quantize.py --lora_path checkpoint/msra/train_trainer/prefix_model --output_dir model_hub/chatglm2-6b-msra-ptuning --quant_bits 4

Then, on any machine:

    model = AutoModel.from_pretrained("model_hub/chatglm2-6b-ner", trust_remote_code=True, dtype="auto").cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained("model_hub/chatglm2-6b-ner", trust_remote_code=True)

Steps: the base (--model_dir, default: base_model_name_or_path of the adapter's adapter_config.json) is loaded in fp32
on the CPU so the merge is exact (a 6B model needs about 25 GB of RAM), the PEFT adapter is merged into the weights
(a P-tuning prefix is kept as it is, its encoder's weights written with the model's and pre_seq_len in config.json),
--quant_bits 8 / 4 quantizes the four linear layers of every block (symmetric, one scale per output row, int4 packed two
per byte: spec section 7, remote_scripts/<version>/quantization.py), and the float tensors are cast to --dtype.

The output folder holds model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json when
the weights exceed --max_shard_size), config.json (official auto_map, quantization_bit), the tokenizer file with
tokenizer_config.json, and the version's configuration/modeling/tokenization/quantization .py files from
--remote_scripts_dir. It is written to a hidden sibling folder and renamed at the end, so a failed run leaves no
half-written output. Refused before any heavy work: an existing --output_dir, an adapter made for another base
(other version in train_args.json, layers the base does not have, or other layer sizes), --quant_bits other than 0/4/8,
and a base that is itself quantized.
"""
import re
import sys
from pathlib import Path


from utils.adapters import check_lora_on_base, check_model_dir, lora_path_kind, read_adapter_config, read_run_record
from utils.config_utils import parse_config
from utils.errors import UserError
from utils.model_utils import (
    DTYPES,
    REPO_ROOT,
    ModelFolderError,
    detect_model_version,
    load_model_and_tokenizer,
    load_model_with_adapter,
    prefix_checkpoint_config,
    read_config,
)
from utils.model_folder import (
    MODEL_FILES,
    folder_config,
    staged_folder,
    unique_state_dict,
    write_model_folder,
    write_native_model_folder,
)
from utils.run_dirs import hold_run_folder, release_run_folder

DEFAULTS = {
    "lora_path": "checkpoint/demo_ner/train_trainer/adapter_model",  # PEFT folder: adapter_config.json + adapter_model.safetensors
    "output_dir": "",  # required: the new model folder (must not exist yet)
    "model_dir": "",  # base model folder; default: base_model_name_or_path of adapter_config.json
    "quant_bits": 0,  # 0 = keep float weights, 8 = int8, 4 = int4
    # dtype of the saved float tensors (embeddings, norms, output layer, scales, biases): fp16, bf16, fp32, or auto:
    # the base's own (torch_dtype in its config.json; fp16 where it names none)
    "dtype": "auto",
    "max_shard_size": "2GB",  # larger weights are split into model-0000i-of-0000n.safetensors (+ index); e.g. 500MB, 4GiB
    "remote_scripts_dir": "remote_scripts",  # where <version>/{configuration,modeling,tokenization,quantization}_*.py come from
}
RENAMED = {"output_path": "output_dir", "qbits": "quant_bits"}  # the old names work until the next release, with a note
SUPPORTED_QBITS = (0, 4, 8)
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MergeError(UserError, ValueError):
    """The request cannot be carried out; the message says why and what to change."""


def parse_size(text) -> int:
    """'2GB' -> 2e9 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024); a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise MergeError(f"--max_shard_size={text!r}: expected a size such as 2GB, 500MB or 4GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def resolve_remote_scripts(remote_scripts_dir, version):
    folder = Path(remote_scripts_dir)
    if not folder.is_absolute() and not folder.is_dir() and (REPO_ROOT / folder).is_dir():
        folder = REPO_ROOT / folder
    missing = [name for name in MODEL_FILES if not (folder / version / name).is_file()]
    if missing:
        raise MergeError(f"{folder / version}: missing {', '.join(missing)}; --remote_scripts_dir must hold <version>/{{{','.join(MODEL_FILES)}}}")
    return folder / version


def check_output_path(output_path):
    if output_path.exists():
        raise MergeError(f"{output_path} already exists; choose another --output_dir or remove it first")


def plan(config):
    """Every check that needs no weights; returns the resolved paths and settings."""
    qbits = config["quant_bits"]
    if qbits not in SUPPORTED_QBITS:
        raise MergeError(f"--quant_bits={qbits}: expected 0 (no quantization), 8 (int8) or 4 (int4)")
    if config["dtype"] not in ("auto", *DTYPES):
        raise MergeError(f"--dtype={config['dtype']!r}: expected auto, fp16, bf16 or fp32")
    max_shard_bytes = parse_size(config["max_shard_size"])
    if not config["output_dir"]:
        raise MergeError("--output_dir is required: the folder to write the merged model to (it must not exist yet)")
    output_path = Path(config["output_dir"])
    check_output_path(output_path)

    lora_path = Path(config["lora_path"])
    try:
        prefix = prefix_checkpoint_config(lora_path) if lora_path_kind(lora_path) == "prefix" else None
        adapter_config = read_adapter_config(lora_path) if prefix is None else {}
    except ModelFolderError as err:
        raise MergeError(str(err)) from err
    peft_type = adapter_config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise MergeError(f"{lora_path}: peft_type is {peft_type}; this script merges LoRA adapters")

    if config["model_dir"]:
        model_dir = Path(config["model_dir"])
    elif prefix is not None:  # a P-tuning run records its base in train_args.json
        base_name = read_run_record(lora_path).get("config", {}).get("model_dir")
        if not base_name or not Path(base_name).is_dir():
            raise MergeError(f"{lora_path}: the P-tuning checkpoint's base is not known here (model_dir in its "
                             "train_args.json); pass the base model folder with --model_dir")
        model_dir = Path(base_name)
    else:
        base_name = adapter_config.get("base_model_name_or_path")
        if not base_name:
            raise MergeError(f"{lora_path / 'adapter_config.json'} names no base_model_name_or_path; pass --model_dir")
        model_dir = Path(base_name)
        if not model_dir.is_dir():
            raise MergeError(
                f"the adapter's base {base_name!r} (base_model_name_or_path in {lora_path / 'adapter_config.json'}) "
                "is not a folder here; pass the base model folder with --model_dir"
            )
    try:
        check_model_dir(model_dir)  # a model folder, not an adapter, prefix or checkpoint-N
        base_config = read_config(model_dir)
    except ModelFolderError as err:
        raise MergeError(str(err)) from err
    if base_config.get("model_type") not in (None, "chatglm"):  # GLM-4 and others of transformers' own classes
        if qbits:
            raise MergeError(f"--quant_bits={qbits}: int8/int4 here is ChatGLM's own quantization and {model_dir} is a "
                             f"{base_config['model_type']} model; merge with --quant_bits 0 and quantize when loading "
                             "(bitsandbytes, as train_qlora.py does)")
        check_fits(lora_path, model_dir)  # made for this model, fitting its layers; no P-tuning prefix
        return {"qbits": 0, "dtype": saved_dtype(config["dtype"], base_config), "max_shard_bytes": max_shard_bytes, "output_path": output_path,
                "lora_path": lora_path, "model_dir": model_dir, "version": None, "base_config": base_config,
                "scripts": None, "prefix": None}
    try:
        version = detect_model_version(base_config, str(model_dir / "config.json"))
    except ModelFolderError as err:
        raise MergeError(str(err)) from err
    if base_config.get("quantization_bit"):
        raise MergeError(
            f"{model_dir} is quantized (quantization_bit={base_config['quantization_bit']}); an adapter can only be merged "
            "into float weights: use the fp16/bf16 base"
        )
    check_fits(lora_path, model_dir)  # made for this model (its run record, the base it names), fitting its layers
    scripts = resolve_remote_scripts(config["remote_scripts_dir"], version)
    return {
        "qbits": qbits, "dtype": saved_dtype(config["dtype"], base_config), "max_shard_bytes": max_shard_bytes, "output_path": output_path,
        "lora_path": lora_path, "model_dir": model_dir, "version": version, "base_config": base_config, "scripts": scripts,
        "prefix": prefix,
    }


def saved_dtype(dtype, base_config):
    """The torch dtype of --dtype; auto: the base's own (torch_dtype / dtype in its config.json), else fp16."""
    saved = base_config.get("torch_dtype") or base_config.get("dtype") if dtype == "auto" else dtype
    return DTYPES.get(str(saved), DTYPES["fp16"])


def check_fits(lora_path, model_dir):
    """utils.adapters.check_lora_on_base, its refusal as a MergeError."""
    try:
        check_lora_on_base(lora_path, model_dir)
    except ModelFolderError as err:
        raise MergeError(str(err)) from err


def load_adapter(base, lora_path, model_dir):
    """PeftModel over `base`; PEFT's size-mismatch error becomes a MergeError naming both folders and the shapes."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(lora_path))
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        shapes = re.findall(
            r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
            r"the shape in current model is torch\.Size\((\[[^\]]*\])\)", str(err)
        )
        details = "\n  ".join(
            f"{name.removeprefix('base_model.model.').replace('.default.', '.')}: adapter {a}, base {b}" for name, a, b in shapes[:5]
        ) or str(err)
        if len(shapes) > 5:
            details += f"\n  (and {len(shapes) - 5} more)"
        raise MergeError(f"the adapter {lora_path} does not fit the base {model_dir}; it was trained on another base:\n  {details}") from err


def write_merged_folder(job, model, folder):
    if job["version"] is None:  # a model of transformers' own classes: its config and tokenizer files, our weights
        return write_native_model_folder(folder, unique_state_dict(model), job["model_dir"], job["max_shard_bytes"])
    # A P-tuning prefix travels in the folder: its weights, and pre_seq_len / prefix_projection in config.json.
    config = folder_config({**job["base_config"], **(job["prefix"] or {})}, job["version"], job["dtype"], job["qbits"])
    return write_model_folder(folder, unique_state_dict(model), config, job["version"], job["model_dir"],
                              job["max_shard_bytes"], scripts_dir=job["scripts"])


def main(config):
    job = plan(config)
    # One writer at a time: a second merge into the same folder stops here, naming the first.
    hold_run_folder(job["output_path"], "--output_dir")
    try:
        check_output_path(job["output_path"])  # again, now that no other merge can be writing it
        return merge(config, job)
    finally:
        release_run_folder(job["output_path"])


def merge(config, job):
    print(f"base: {job['model_dir']} ({job['version'] or job['base_config']['model_type']}); adapter: {job['lora_path']}; "
          f"quantization: {'int%d' % job['qbits'] if job['qbits'] else 'none'}; dtype: {str(job['dtype'])[6:]}")

    if job["prefix"]:
        model, _ = load_model_with_adapter(job["model_dir"], job["lora_path"], dtype="fp32", device="cpu")
        print(f"the P-tuning prefix ({job['prefix']['pre_seq_len']} positions) goes into the folder with the weights")
    else:
        base, _ = load_model_and_tokenizer(job["model_dir"], dtype="fp32", device="cpu", version=job["version"])
        model = load_adapter(base, job["lora_path"], job["model_dir"])
        model = model.merge_and_unload(safe_merge=True)
        print("merged the adapter into the weights (fp32)")
    if job["qbits"]:
        model.quantize(job["qbits"])
        print(f"quantized the block layers to int{job['qbits']}")
    model = model.to(job["dtype"]).eval()

    output_path = job["output_path"]
    with staged_folder(output_path) as staging:
        files = write_merged_folder(job, model, staging)
    size = sum((output_path / name).stat().st_size for name in files)
    print(f"wrote {output_path} ({len(files)} weight file(s), {size / 2**20:.1f} MiB)")
    return output_path


if __name__ == "__main__":
    try:
        main(parse_config(DEFAULTS, description=__doc__, renamed=RENAMED))
    except (MergeError, ModelFolderError, FileExistsError) as err:
        sys.exit(f"error: {err}")

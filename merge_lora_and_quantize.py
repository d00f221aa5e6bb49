"""Merge a LoRA adapter into its base model (or put a P-tuning v2 prefix beside its weights), optionally quantize to
int8 / int4, and write one model folder that loads anywhere with transformers + torch alone (AutoModel / AutoTokenizer
with trust_remote_code=True). A GLM-4 (or other transformers-native) base gets a folder of its own layout (--quant_bits 0).
With --lora_path=none the --model_dir folder alone is written (quantized, exported). --gguf f16 / q8_0 / q4_0 also
writes <output_dir>/<its name>-<type>.gguf for llama.cpp and Ollama (ChatGLM2-6B, ChatGLM3-6B, GLM-4), from the merged
float weights, with an Ollama Modelfile beside it (README "Run on llama.cpp / Ollama").

    python merge_lora_and_quantize.py --lora_path checkpoint/demo_ner/train_trainer/adapter_model --output_dir model_hub/chatglm2-6b-ner
    python merge_lora_and_quantize.py --lora_path checkpoint/msra/train_trainer/prefix_model --output_dir model_hub/msra-ptuning-int4 --quant_bits 4
    python merge_lora_and_quantize.py --lora_path checkpoint/msra/train_trainer/adapter_model \
        --output_dir model_hub/msra-gguf --gguf q4_0

The base (--model_dir; default: the run's, as the adapter's files name it) is loaded in fp32 on the CPU so the merge is
exact (a 6B model needs about 25 GB of RAM). --quant_bits 8 / 4 quantizes the four linear layers of every block (one scale
per output row, int4 packed two per byte), and ChatGLM2/3's output layer to int8 either way; the float tensors are cast
to --dtype. The folder (weights sharded above --max_shard_size, config.json with the official auto_map, the tokenizer,
the .py files of --remote_scripts_dir) is written beside and renamed at the end. Refused before any heavy work: an
existing output folder, an adapter made for another base, --quant_bits other than 0/4/8, a quantized base; with --gguf,
a TYPE it cannot write, ChatGLM-6B (v1) and a P-tuning prefix (neither has a place in llama.cpp).
"""
import re
import sys
from pathlib import Path

from utils.adapters import check_lora_on_base, check_model_dir, load_trained, read_trained_path
from utils.config_utils import parse_config
from utils.errors import UserError
from utils.gguf_export import GGUFExportError, check_gguf_type, export_gguf, gguf_family
from utils.model_folder import (MODEL_FILES, folder_config, unique_state_dict, write_model_folder,
                                write_native_model_folder)
from utils.model_loading import DTYPES, REPO_ROOT, ModelFolderError, chatglm_version, load_model_and_tokenizer
from utils.run_dirs import hold_run_folder, release_run_folder, staged_folder

DEFAULTS = {
    # PEFT folder (adapter_config.json + adapter_model.safetensors), a P-tuning prefix, or none: --model_dir alone
    "lora_path": "checkpoint/demo_ner/train_trainer/adapter_model",
    "output_dir": "",  # required: the new model folder (must not exist yet)
    "model_dir": "",  # base model folder; default: base_model_name_or_path of adapter_config.json
    "quant_bits": 0,  # 0 = keep float weights, 8 = int8, 4 = int4
    # dtype of the saved float tensors (embeddings, norms, output layer, scales, biases): fp16, bf16, fp32, or auto:
    # the base's own (torch_dtype in its config.json; fp16 where it names none)
    "dtype": "auto",
    "max_shard_size": "2GB",  # larger weights are split into model-0000i-of-0000n.safetensors (+ index); e.g. 500MB, 4GiB
    "remote_scripts_dir": "remote_scripts",  # where <version>/{configuration,modeling,tokenization,quantization}_*.py come from
    "gguf": "",  # also write a GGUF for llama.cpp / Ollama: f16, q8_0 or q4_0 (empty: none)
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


def model_source(config, trained):
    """The folder the model comes from: the base of an adapter or prefix, or --model_dir alone (--lora_path=none)."""
    if trained.kind in ("adapter", "prefix"):
        base = config["model_dir"] or trained.base()
        if not base:
            raise MergeError(f"{trained.path}: its base is not known here (no model_dir in its train_args.json nor "
                             "base_model_name_or_path in an adapter_config.json); pass the base folder with "
                             "--model_dir")
        return Path(base)
    if not config["model_dir"]:
        raise MergeError("--lora_path=none: pass the model folder to write with --model_dir")
    return Path(config["model_dir"])


def check_gguf_request(job):
    """--gguf: a type we write, a model llama.cpp runs, and nothing trained that llama.cpp cannot carry."""
    check_gguf_type(job["gguf"])
    job["gguf_family"] = gguf_family(job["version"], job["base_config"])
    if job["trained"].kind == "prefix":
        raise MergeError(f"--gguf: {job['trained'].path} is a P-tuning v2 prefix: it feeds learned keys and values to "
                         "every layer, which llama.cpp has no place for, so the GGUF would not be the trained model; "
                         "export a LoRA-trained model, or write the folder without --gguf")


def plan(config):
    """Every check that needs no weights; returns the resolved paths and settings."""
    qbits = config["quant_bits"]
    if qbits not in SUPPORTED_QBITS:
        raise MergeError(f"--quant_bits={qbits}: expected 0 (no quantization), 8 (int8) or 4 (int4)")
    if config["dtype"] not in ("auto", *DTYPES):
        raise MergeError(f"--dtype={config['dtype']!r}: expected auto, fp16, bf16 or fp32")
    job = {"qbits": qbits, "max_shard_bytes": parse_size(config["max_shard_size"]), "gguf": config["gguf"]}
    if not config["output_dir"]:
        raise MergeError("--output_dir is required: the folder to write the merged model to (it must not exist yet)")
    job["output_path"] = Path(config["output_dir"])
    check_output_path(job["output_path"])
    job["trained"] = trained = read_trained_path(config["lora_path"], config["model_dir"])
    peft_type = trained.own_config.get("peft_type", "LORA") if trained.kind == "adapter" else "LORA"
    if peft_type != "LORA":
        raise MergeError(f"{trained.path}: peft_type is {peft_type}; this script merges LoRA adapters")
    job["model_dir"] = model_dir = model_source(config, trained)
    job["base_config"] = base_config = check_model_dir(model_dir)  # not an adapter, prefix or checkpoint-N
    # auto: the base's own dtype (its config.json's torch_dtype / dtype), fp16 where it names none
    saved = base_config.get("torch_dtype") or base_config.get("dtype") if config["dtype"] == "auto" else config["dtype"]
    job["dtype"] = DTYPES.get(str(saved), DTYPES["fp16"])
    job["version"] = version = chatglm_version(base_config, str(model_dir / "config.json"))
    if version is None and qbits:  # GLM-4 and others of transformers' own classes
        raise MergeError(f"--quant_bits={qbits}: int8/int4 here is ChatGLM's own quantization and {model_dir} is a "
                         f"{base_config['model_type']} model; merge with --quant_bits 0 and quantize when loading "
                         "(bitsandbytes, as train_qlora.py does)")
    if base_config.get("quantization_bit"):
        raise MergeError(f"{model_dir} is quantized (quantization_bit={base_config['quantization_bit']}); merging an "
                         "adapter, quantizing and --gguf all start from float weights: use the fp16/bf16 folder it "
                         "was made from")
    if trained.kind in ("adapter", "prefix"):
        check_lora_on_base(trained, model_dir)  # made for this model (its record, the base it names), fitting it
    if job["gguf"]:
        check_gguf_request(job)
    return {**job, "scripts": resolve_remote_scripts(config["remote_scripts_dir"], version) if version else None}


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
            r"the shape in current model is torch\.Size\((\[[^\]]*\])\)", str(err))
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
    config = folder_config({**job["base_config"], **job["trained"].prefix}, job["version"], job["dtype"], job["qbits"],
                           getattr(model.config, "output_layer_quantization_bit", 0))
    return write_model_folder(folder, unique_state_dict(model), config, job["version"], job["model_dir"],
                              job["max_shard_bytes"], scripts_dir=job["scripts"])


def main(config):
    try:
        job = plan(config)
    except (ModelFolderError, GGUFExportError) as err:  # the adapter's, the base's and the GGUF's refusals, as ours
        raise MergeError(str(err)) from err
    # One writer at a time: a second merge into the same folder stops here, naming the first.
    hold_run_folder(job["output_path"], "--output_dir")
    try:
        check_output_path(job["output_path"])  # again, now that no other merge can be writing it
        return merge(config, job)
    finally:
        release_run_folder(job["output_path"])


def load_model(job):
    """The model to write, in fp32 on the CPU (exact merge): base + adapter merged, base + prefix, or the folder."""
    trained = job["trained"]
    if trained.kind == "prefix":
        model, tokenizer = load_trained(job["model_dir"], trained, dtype="fp32", device="cpu")
        print(f"the P-tuning prefix ({trained.prefix['pre_seq_len']} positions) goes into the folder with the weights")
        return model, tokenizer
    model, tokenizer = load_model_and_tokenizer(job["model_dir"], dtype="fp32", device="cpu", version=job["version"])
    if trained.kind == "adapter":
        model = load_adapter(model, trained.path, job["model_dir"]).merge_and_unload(safe_merge=True)
        print("merged the adapter into the weights (fp32)")
    return model, tokenizer


def write_gguf_file(job, model, tokenizer, folder):
    """<folder>/<output folder name>-<type>.gguf (and the Modelfile) from the float model; returns (name, size, s)."""
    path, size, seconds = export_gguf(folder, job["output_path"].name, job["gguf"], job["gguf_family"],
                                      job["base_config"], tokenizer, model.state_dict())
    return path.name, size, seconds


def merge(config, job):
    trained = job["trained"]
    print(f"base: {job['model_dir']} ({job['version'] or job['base_config']['model_type']}); adapter: "
          f"{trained.path if trained.kind in ('adapter', 'prefix') else 'none'}; "
          f"quantization: {'int%d' % job['qbits'] if job['qbits'] else 'none'}; dtype: {str(job['dtype'])[6:]}")
    model, tokenizer = load_model(job)
    with staged_folder(job["output_path"]) as staging:
        gguf_file = write_gguf_file(job, model, tokenizer, staging) if job["gguf"] else None
        if job["qbits"]:
            model.quantize(job["qbits"])
            head_bits = getattr(model.config, "output_layer_quantization_bit", 0)  # ChatGLM2/3
            print(f"quantized the block layers to int{job['qbits']}"
                  + (f", the output layer to int{head_bits}" if head_bits else ""))
        model = model.to(job["dtype"]).eval()
        files = write_merged_folder(job, model, staging)
    size = sum((job["output_path"] / name).stat().st_size for name in files)
    print(f"wrote {job['output_path']} ({len(files)} weight file(s), {size / 2**20:.1f} MiB)")
    if gguf_file:
        name, size, seconds = gguf_file
        print(f"wrote {job['output_path'] / name} ({size / 2**20:.1f} MiB in {seconds:.1f} s) and its Ollama Modelfile")
    return job["output_path"]


if __name__ == "__main__":
    try:
        main(parse_config(DEFAULTS, description=__doc__, renamed=RENAMED))
    except (MergeError, ModelFolderError, GGUFExportError, FileExistsError) as err:
        sys.exit(f"error: {err}")

"""The training methods, set up on a loaded model and exported at the end of a run: LoRA (a PEFT adapter), the k-bit
base of train_qlora.py, P-tuning v2 (the official prefix layout), freeze tuning and full fine-tuning (a model folder);
each export with the run record beside it, ZeRO-3 shards gathered where it needs them whole."""
import contextlib
import copy
import os
import re
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from utils.adapters import ADAPTER_DIR, PREFIX_DIR
from utils.config_utils import ConfigError
from utils.graphed_blocks import graph_blocks
from utils.lora_dropout import drop_inside_lora_a
from utils.model_folder import folder_config, write_model_folder, write_native_model_folder
from utils.run_dirs import staged_folder
from utils.model_loading import PREFIX_KEY, load_model_and_tokenizer, read_config
from utils.run_record import write_run_record

FULL_MODEL_DIR = "model"  # where --method=full (and freeze) writes the fine-tuned model folder
FULL_MODEL_SHARD_BYTES = 2 * 10**9
CHATGLM_LINEAR_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# What bitsandbytes must leave unquantized once any module is named (naming some replaces transformers' default
# list, which is the output layer): ChatGLM-6B's lm_head, ChatGLM2/3's output_layer, and P-tuning's prefix encoder,
# which trains (with prefix_projection it holds two Linear layers that would otherwise be quantized and frozen).
PREFIX_SKIP_MODULES = ["lm_head", "transformer.output_layer", "transformer.prefix_encoder"]
KBIT_BITS = (4, 8)
QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")  # bitsandbytes' storage types
# transformer.encoder.layers.N. (ChatGLM2/3), transformer.layers.N. (v1), model.layers.N. (GLM-4)
BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")


def print_trainable_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def setup_method(model, config, method, master_fp32=True):
    """`model` made to train by `method` (a PeftModel for lora); prints what trains. master_fp32: freeze tuning's
    blocks in fp32 (the optimizer's master copy; not under DeepSpeed, which keeps its own)."""
    if method == "lora":
        model = add_lora(model, config["lora"])
        model.print_trainable_parameters()
        return model
    if method == "ptuning":
        train_prefix_only(model, config["model_dir"])  # in fp32 on a half-precision or k-bit base, as officially
    elif method == "freeze":
        freeze_all_but(model, **config["freeze"])
        for param in model.parameters():
            if master_fp32 and param.requires_grad:
                param.data = param.data.float()
    print_trainable_parameters(model)
    return model


def load_model_to_train(config, dtype, device, master_fp32=True, quantization_config=None):
    """(model, tokenizer) of --model_dir set up to train by --method. The prefix encoder is initialised as the model
    loads, the LoRA weights after it: both follow --seed. A quantized base (QLoRA) is readied by prepare_kbit_model."""
    ptuning = config["method"] == "ptuning"
    transformers.set_seed(config["seed"])
    model, tokenizer = load_model_and_tokenizer(
        config["model_dir"], dtype=dtype, device=device, quantization_config=quantization_config,
        **({"pre_seq_len": config["pre_seq_len"], "prefix_projection": config["prefix_projection"]} if ptuning else {}))
    if quantization_config is not None:
        model = prepare_kbit_model(model, dtype, gradient_checkpointing=config["gradient_checkpointing"])
    elif config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if config["recompute_mlp_blocks"]:
        try:
            recompute_mlps(model, config["recompute_mlp_blocks"])
        except ValueError as error:
            raise ConfigError(f"--recompute_mlp_blocks: {error}") from None
    transformers.set_seed(config["seed"])
    model = setup_method(model, config, config["method"], master_fp32=master_fp32)
    # DeepSpeed (train_deepspeed.py; train_trainer.py's loads on the CPU) and several processes hook into autograd's
    # per-parameter gradients, which the graphs write directly.
    if (config["graph_blocks"] and config["gradient_checkpointing"] and not config.get("deepspeed")
            and torch.device(device).type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) == 1):
        graph_blocks(model)
    return model, tokenizer


def recompute_mlps(model, blocks):
    """The MLPs of the first `blocks` blocks (ours: remote_scripts/*/modeling_chatglm.py's, GLM-4's of
    utils/glm_layers.py) run their up-projection and activation again in backward, keeping their input instead of the
    up-projection's output, the largest activation a block saves (ChatGLM2-6B and GLM-4-9B: 53.5 KiB a token); the
    others keep everything. Returns how many such MLPs the model has."""
    mlps = [module for module in model.modules() if hasattr(module, "recompute_activation")]
    if blocks > len(mlps):
        raise ValueError(f"recompute_mlp_blocks={blocks}, but the model has {len(mlps)} blocks whose MLP can recompute")
    for index, mlp in enumerate(mlps):
        mlp.recompute_activation = index < blocks
    return len(mlps)


def lora_target_modules(spec, chatglm=True):
    """'query_key_value' (the default of the seeds), 'all' (every linear layer of the blocks: ChatGLM's four, or on
    other models peft's "all-linear", every linear layer but the output layer), or a comma list."""
    if spec == "all":
        return list(CHATGLM_LINEAR_LAYERS) if chatglm else "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def add_lora(model, lora):
    """Wrap the model with LoRA adapters (kept in fp32 on half-precision weights by peft), their dropout drawn again
    in backward rather than kept (utils/lora_dropout.py)."""
    chatglm = getattr(model, "model_version", None) is not None
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], task_type="CAUSAL_LM",
                        target_modules=lora_target_modules(lora["target_modules"], chatglm=chatglm))
    model = get_peft_model(model, config)
    drop_inside_lora_a(model)
    return model


@contextlib.contextmanager
def gathered_trainable_parameters(model):
    """Under ZeRO-3 every process takes part in gathering the trainable (LoRA) weights for rank 0 to save whole."""
    partitioned = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def export(output_dir, name, train_args: dict, write):
    """<output_dir>/<name>/: what write(folder) puts there and the run record, written aside and swapped in (a crash
    keeps the last good one)."""
    final = Path(output_dir) / name
    with staged_folder(final, replace=True) as staging:
        write(staging)
        write_run_record(staging, train_args)
    return final


def save_adapter(model, output_dir, train_args: dict):
    """The adapter in PEFT format, in <output_dir>/adapter_model/."""
    return export(output_dir, ADAPTER_DIR, train_args,
                  lambda folder: model.save_pretrained(str(folder), safe_serialization=True))


def kbit_quantization_config(bits, compute_dtype, ptuning=False):
    """train_qlora.py's base: 4 bits NF4 with double quantization (QLoRA), 8 bits LLM.int8 (both run on CPU too);
    with ptuning the prefix encoder stays a float module."""
    from transformers import BitsAndBytesConfig

    if bits not in KBIT_BITS:
        raise ConfigError(f"--quant_bits={bits!r}: use 4 (NF4 with double quantization) or 8 (LLM.int8)")
    skip = {"llm_int8_skip_modules": PREFIX_SKIP_MODULES} if ptuning else {}
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **skip)


def prepare_kbit_model(model, compute_dtype, gradient_checkpointing=True):
    """A k-bit model readied for LoRA or P-tuning: every parameter frozen, the unquantized ones in `compute_dtype`
    (peft's prepare_model_for_kbit_training casts them to fp32: ChatGLM2/3's embeddings, output layer and residual
    stream, which nothing needs), blocks checkpointed with use_reentrant=False."""
    for param in model.parameters():
        param.requires_grad_(False)
        # Quantized storage (Params4bit, possibly with a float quant_storage; Int8Params) is left as it is.
        quantized = type(param).__name__ in QUANTIZED_PARAMETERS
        if param.is_floating_point() and not quantized and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def train_prefix_only(model, model_dir):
    """P-tuning v2 (THUDM's): the prefix encoder alone trains, in fp32 (also on a half or k-bit base, as officially)."""
    if not hasattr(getattr(model, "transformer", None), "pre_seq_len"):
        raise ConfigError(f"--method=ptuning: {model_dir} is not a ChatGLM model; P-tuning v2 here is ChatGLM's own")
    if not model.transformer.pre_seq_len:
        raise ConfigError("--method=ptuning needs --pre_seq_len > 0 (the prefix length; the official runs used 128)")
    model.freeze_all_but_prefix()  # again: prepare_kbit_model froze every parameter
    model.transformer.prefix_encoder.float()
    return model


def prefix_state(model):
    """The trained prefix encoder's tensors under their official names (transformer.prefix_encoder.*), on the CPU."""
    return {name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()
            if name.startswith(PREFIX_KEY)}


def write_partial_checkpoint(folder, state, config):
    """The trained tensors (model.safetensors) and config.json: the official P-tuning v2 layout (freeze's too)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(config, "quantization_config", None) is not None:
        # A bitsandbytes base (train_qlora.py): how the run held the base is no part of the prefix, and a reader of
        # the official layout would take the folder for a quantized model. train_args.json records it.
        config = copy.copy(config)
        del config.quantization_config
    config.to_json_file(str(folder / "config.json"))


def save_prefix(model, output_dir, train_args: dict):
    """The P-tuning v2 checkpoint in <output_dir>/prefix_model/ (taken by --lora_path)."""
    return export(output_dir, PREFIX_DIR, train_args,
                  lambda folder: write_partial_checkpoint(folder, prefix_state(model), model.config))


def freeze_selection(parameter_names, trainable_layers, trainable_modules="all", extra_modules=""):
    """The names among `parameter_names` that freeze tuning trains (see freeze_all_but), also on the meta model before
    loading; an option naming a block the model lacks, or a module that matches nothing, says what there is."""
    parameter_names = list(parameter_names)
    blocks = sorted({int(m.group(1)) for name in parameter_names if (m := BLOCK_INDEX.search(name))})
    if not blocks or trainable_layers == 0 or abs(trainable_layers) > len(blocks):
        raise ConfigError(f"--freeze_trainable_layers={trainable_layers}: the model has {len(blocks)} blocks; give "
                          f"1..{len(blocks)} (the last N) or -1..-{len(blocks)} (the first N)")
    chosen = set(blocks[-trainable_layers:] if trainable_layers > 0 else blocks[:-trainable_layers])
    modules = [m.strip() for m in trainable_modules.split(",") if m.strip()]
    extras = [m.strip() for m in extra_modules.split(",") if m.strip()]
    inside = {name.split(".layers.", 1)[1].split(".", 1)[1] for name in parameter_names if BLOCK_INDEX.search(name)}
    unknown = [m for m in modules if m != "all" and not any(f".{m}." in f".{n}" for n in inside)]
    if not modules or unknown:
        what = f"{unknown} matches nothing in a block" if unknown else "names no module"
        raise ConfigError(f"--freeze_trainable_modules={trainable_modules!r}: {what}; use all, or names from a block's "
                          f"parameters {sorted(inside)}")
    outside = [name for name in parameter_names if not BLOCK_INDEX.search(name)]
    missing = [m for m in extras if not any(m in name for name in outside)]
    if missing:
        raise ConfigError(f"--freeze_extra_modules={extra_modules!r}: {missing} match no parameter outside the blocks; "
                          f"those are {outside}")

    def trains(name):
        match = BLOCK_INDEX.search(name)
        if match:
            return int(match.group(1)) in chosen and ("all" in modules or any(f".{m}." in name for m in modules))
        return any(m in name for m in extras)

    return [name for name in parameter_names if trains(name)]


def freeze_all_but(model, trainable_layers, trainable_modules="all", extra_modules=""):
    """Freeze tuning (as LLaMA-Factory's): the last `trainable_layers` blocks train (negative: the first ones), in them
    the comma-separated `trainable_modules` ("all": whole blocks), plus `extra_modules` outside the blocks. Returns
    the trained parameter names."""
    trained = set(freeze_selection((name for name, _ in model.named_parameters()), trainable_layers, trainable_modules,
                                   extra_modules))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return [name for name, _ in model.named_parameters() if name in trained]


def gathered_state_dict(model, keep, dtype=None):
    """The whole state dict on the CPU (cast to `dtype`) for the process that saves (`keep`), else None. Under ZeRO-3
    every process calls it: one weight is gathered at a time. Tied weights are copied apart (safetensors wants that)."""
    state, copies = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in copies:
            context = contextlib.nullcontext()
            if hasattr(tensor, "ds_id"):  # a ZeRO-3 partitioned parameter
                import deepspeed

                context = deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
            with context:
                kept = tensor.detach().to("cpu", copy=True) if keep else None
            if kept is not None and dtype is not None and kept.is_floating_point():
                kept = kept.to(dtype)
            copies[id(tensor)] = kept
            state[name] = kept
        elif keep:
            state[name] = copies[id(tensor)].clone()
    return state if keep else None


def save_full_model(state, model_version, source_dir, output_dir, train_args: dict):
    """A fully fine-tuned model in the official layout, <output_dir>/model/ (loads as --model_dir): the weights of
    `state`, the config, tokenizer and our .py files from the base model folder `source_dir`."""
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())

    def write(folder):
        if model_version is None:  # a model of transformers' own classes (GLM-4): its own config and tokenizer files
            write_native_model_folder(folder, state, source_dir, FULL_MODEL_SHARD_BYTES)
        else:
            config = folder_config(read_config(source_dir), model_version, dtype)
            write_model_folder(folder, state, config, model_version, source_dir, FULL_MODEL_SHARD_BYTES)

    return export(output_dir, FULL_MODEL_DIR, train_args, write)


def check_only_float_weights_train(model):
    """A k-bit model without PEFT wrapper: something trains, and all of it is float (unquantized); else ValueError."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    quantized = [name for name, p in trained if not p.is_floating_point() or type(p).__name__ in QUANTIZED_PARAMETERS]
    if not trained or quantized:
        raise ValueError(f"a quantized model trains only float tensors beside its frozen quantized weights; "
                         f"{'nothing trains' if not trained else f'{quantized[0]} is quantized'}")

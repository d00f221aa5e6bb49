"""Where training memory goes, per token: the bytes one block of GLM-4-9B saves for its backward pass, by module.

A LoRA training step's peak memory is the weights plus what every block keeps from its forward pass for the
backward pass, which grows with the tokens of the batch. This script builds GLM-4-9B's block at its real size (two
blocks, transformers' GlmConfig defaults = glm-4-9b-chat-hf's config.json, or --model_type glm4 for GLM-4-0414's
layout; a small vocabulary), random weights in bf16, adds LoRA as the speed table's lora-glm4 row does, runs one
forward pass of the loss under bf16 autocast on the CPU, and counts the tensors autograd saves inside the second
block (each storage once, weights left out). Kernels differ on a GPU, the saved tensors barely do: multiply by the
blocks and the tokens of a batch for the activation part of the peak.

    python benchmarks/saved_activations.py                      # LoRA r 8 on q,k,v, dropout 0.1 (the lora-glm4 row)
    python benchmarks/saved_activations.py --lora_dropout 0     # the same without dropout
    python benchmarks/saved_activations.py --peft_casts_inputs  # LoRA's inputs cast to fp32 (peft's default)
    TRITON_INTERPRET=1 python benchmarks/saved_activations.py --fused_layers  # norms and MLPs as the loader fuses them
"""
import argparse
import collections
import sys
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import lora_dropout  # noqa: E402
from utils.glm_layers import fuse_norms_and_mlps  # noqa: E402
from utils.model_loading import remote_module  # noqa: E402
from utils.trainer import target_losses  # noqa: E402
from utils.training_methods import add_lora  # noqa: E402

MEASURED_BLOCK = ".layers.1"  # the second block: the first one's input comes from the embedding


def build_model(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, num_hidden_layers=2, vocab_size=4096, pad_token_id=0, eos_token_id=[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.model_version = None
    return model


def saved_bytes_by_module(model, tokens, uncast=True):
    """{module path within the measured block: bytes saved for backward}, from one forward pass of the loss."""
    stack, saved, seen = [None], collections.Counter(), {p.untyped_storage().data_ptr() for p in model.parameters()}
    for name, module in model.named_modules():
        if name.endswith(MEASURED_BLOCK) or MEASURED_BLOCK + "." in name:
            path = name.split(MEASURED_BLOCK)[1].lstrip(".").replace(".base_layer", "").replace(".default", "")
            module.register_forward_pre_hook(lambda module, args, path=path or "(the block itself)": stack.append(path))
            module.register_forward_hook(lambda module, args, output: stack.pop() and None)

    def pack(tensor):
        storage = tensor.untyped_storage()
        if stack[-1] is not None and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[stack[-1]] += storage.nbytes()
        return tensor

    input_ids = torch.randint(5, 4000, (1, tokens))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast("cpu", dtype=torch.bfloat16),
          disable_input_dtype_casting(model, active=uncast)):  # LoRA's inputs as our Trainer leaves them under autocast
        target_losses(model, inputs)
    return saved


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", default="glm", choices=("glm", "glm4"),
                        help="glm: glm-4-9b-chat-hf's layout (GlmConfig); glm4: GLM-4-0414's (two more norms per block)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_dropout", type=float, default=0.1)
    parser.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj")
    parser.add_argument("--batch_tokens", type=int, default=8 * 512, help="for the extrapolation: tokens of a batch")
    parser.add_argument("--peft_casts_inputs", action="store_true",
                        help="LoRA's inputs cast to the fp32 adapter's dtype (peft's default; our Trainer turns it off)")
    parser.add_argument("--fused_layers", action="store_true",
                        help="the norms and MLPs on our kernels, as the loader gives them on CUDA (utils/glm_layers.py); "
                             "on this CPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1")
    args = parser.parse_args()
    lora_dropout.REDRAW_DEVICES = ("cuda", "cpu")  # this CPU stands for the GPU: LoRA's dropout as CUDA runs it
    from transformers import AutoConfig

    real_blocks = AutoConfig.for_model(args.model_type).num_hidden_layers  # the defaults: GLM-4-9B's 40
    model = build_model(args.model_type)
    if args.fused_layers:
        kernels = remote_module("chatglm2-6b", "kernels")
        if not kernels._INTERPRETED:
            sys.exit("--fused_layers: set TRITON_INTERPRET=1 (the kernels run on the CPU in Triton's interpreter)")
        fuse_norms_and_mlps(model, kernels)
    model = add_lora(model, {"r": args.lora_r, "alpha": 4 * args.lora_r, "dropout": args.lora_dropout,
                             "target_modules": args.lora_target_modules})
    model.train()
    saved = saved_bytes_by_module(model, args.tokens, uncast=not args.peft_casts_inputs)
    per_token = {path: size / args.tokens / 1024 for path, size in saved.items()}
    total = sum(per_token.values())
    print(f"# GLM-4-9B block ({args.model_type}), LoRA r {args.lora_r} on {args.lora_target_modules}, dropout "
          f"{args.lora_dropout}{', inputs cast by peft' if args.peft_casts_inputs else ''}"
          f"{', norms and MLPs fused' if args.fused_layers else ''}: saved for backward per token, "
          f"the second of {model.config.num_hidden_layers} blocks")
    print("| module | KiB per token |\n|---|---|")
    for path, kib in sorted(per_token.items(), key=lambda item: -item[1]):
        print(f"| {path} | {kib:.1f} |")
    print(f"| **the block** | **{total:.1f}** |")
    gib = total * 1024 * real_blocks * args.batch_tokens / 2**30
    print(f"\n{real_blocks} blocks x {args.batch_tokens} tokens: {gib:.1f} GiB of saved activations")


if __name__ == "__main__":
    main()

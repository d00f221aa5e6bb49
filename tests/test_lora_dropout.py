"""LoRA's dropout inside lora_A (utils/lora_dropout.py): the masks drawn again in backward give autograd's gradients
through the same mask, layers that read one input keep it once, and the adapter's names and evaluation are peft's."""
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from utils import lora_dropout
from utils.lora_dropout import DroppedInputLinear, DropoutLinear, dropped
from utils.model_loading import load_model_and_tokenizer
from utils.training_methods import add_lora


def reference_grads(x, weight, p, seed, autocast):
    """dropout(x) @ weight.T by autograd with the mask DropoutLinear draws (read off a tensor of ones)."""
    ones = torch.ones(x.shape, dtype=x.dtype, device=x.device)
    scale = (dropped(ones, p, seed) != 0) * (1 / (1 - p))  # fp32, as CUDA's dropout scales
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = F.linear((x.float() * scale).to(x.dtype), weight)
    out.backward(torch.linspace(-1, 1, out.numel(), device=x.device).reshape(out.shape).to(out.dtype))
    return out.detach(), x.grad, weight.grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                        reason="needs CUDA"))])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, True)])
def test_the_mask_drawn_again_in_backward_gives_autograds_gradients(dtype, autocast, device):
    """Forward and both gradients equal autograd through the same mask, for a strided input too (its mask follows
    the logical order, so backward's contiguous gradient meets the same one)."""
    p, seed = 0.3, 1234
    x = torch.randn(16, 6, 24).to(device, dtype).transpose(0, 1)  # [6, 16, 24], not contiguous
    weight = torch.randn(8, 24, device=device)  # fp32, as peft keeps adapters
    expected_out, expected_dx, expected_dw = reference_grads(x, weight, p, seed, autocast)
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = DroppedInputLinear.apply(x, weight, p, seed)
    out.backward(torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape).to(out.dtype))
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
    assert x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, expected_dx, atol=0, rtol=0)
    torch.testing.assert_close(weight.grad, expected_dw, atol=0, rtol=0)


def test_masks_drop_p_of_the_values_and_scale_the_rest():
    x = torch.randn(256, 512)
    out = dropped(x, 0.1, 7)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.01
    torch.testing.assert_close(out[kept], x[kept] / 0.9)
    assert torch.equal(out, dropped(x, 0.1, 7)) and not torch.equal(out, dropped(x, 0.1, 8))


def tiny_glm(layers=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("glm", num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  pad_token_id=0, eos_token_id=[1])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def saved_bytes(model, ids):
    """Bytes autograd keeps for backward in one training forward pass of the loss, each storage once, weights left
    out."""
    seen = {param.untyped_storage().data_ptr() for param in model.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    return total


@pytest.fixture
def redraw_on_cpu(monkeypatch):
    """The CPU standing for a CUDA device: masks drawn again there too."""
    monkeypatch.setattr(lora_dropout, "REDRAW_DEVICES", ("cuda", "cpu"))


def test_q_k_and_v_keep_their_input_once_and_keep_peft_names(redraw_on_cpu):
    """GLM-4's q, k and v read one input: with dropout they now keep what they keep without it (peft's dropout keeps
    a dropped copy and a mask per layer). The adapter's tensors keep peft's names, and evaluation applies no dropout."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    lora = {"r": 4, "alpha": 8, "target_modules": "q_proj,k_proj,v_proj"}
    models = {p: add_lora(tiny_glm(), {**lora, "dropout": p}).train() for p in (0.0, 0.1)}
    replaced = [m for m in models[0.1].modules() if isinstance(m, DropoutLinear)]
    assert len(replaced) == 6 and not any(isinstance(m, DropoutLinear) for m in models[0.0].modules())
    assert not any(type(m) is torch.nn.Dropout for m in models[0.1].modules())
    assert saved_bytes(models[0.1], ids) == saved_bytes(models[0.0], ids)

    plain = get_peft_model(tiny_glm(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                  target_modules=["q_proj", "k_proj", "v_proj"]))
    plain_bytes = saved_bytes(plain.train(), ids)
    assert plain_bytes > saved_bytes(models[0.1], ids)  # what peft's own dropout keeps more
    assert list(models[0.1].state_dict()) == list(plain.state_dict())
    for each in models.values():
        each.eval()
    with torch.no_grad():
        assert torch.equal(models[0.1](input_ids=ids).logits, models[0.0](input_ids=ids).logits)


def test_gradient_checkpointing_recomputes_the_same_masks(tiny_model_dirs, redraw_on_cpu):
    """Checkpointed blocks run their forward again in backward; the seeds come from the CPU generator, which the
    checkpoint restores, so the gradients are those of the run without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model, _ = load_model_and_tokenizer(tiny_model_dirs["chatglm2-6b"], dtype="fp32", device="cpu")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(0)
        model = add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.3, "target_modules": "all"}).train()
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts them at zero, where the masks would change no gradient
                param.data.normal_()
        ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: param.grad for name, param in model.named_parameters() if param.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=0, rtol=0, msg=name)


def test_on_the_cpu_the_dropout_is_torchs_as_peft_applies_it():
    """Off REDRAW_DEVICES, DropoutLinear applies torch's dropout: the same draws, the same training forward as peft's
    own layers."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    lora = {"r": 4, "alpha": 8, "dropout": 0.3, "target_modules": "q_proj,k_proj,v_proj"}
    ours = add_lora(tiny_glm(), lora).train()
    plain = get_peft_model(tiny_glm(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "v_proj"])).train()
    ours.load_state_dict(plain.state_dict())  # lora_B nonzero, so that the masks show in the output
    logits = []
    for model in (ours, plain):
        torch.manual_seed(5)
        logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
    torch.manual_seed(6)
    assert not torch.equal(ours(input_ids=ids).logits, logits[0])  # dropout is on

"""Freeze tuning (--method=freeze): only the chosen blocks (and named extra modules) train; checkpoints hold those
tensors only and a resumed run ends at the uninterrupted weights; the run writes a whole model folder that every later
script loads as --model_dir."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script, train_then_resume
from test_training import logged_losses
from utils.model_loading import load_model_and_tokenizer
from utils.training_methods import freeze_all_but


def test_freeze_tuning_trains_the_last_block_only_resumes_exactly_and_writes_a_model_folder(trainable_models, sixteen_examples,
                                                                                            tmp_path):
    model_dir = trainable_models["chatglm2-6b"]
    common = [f"--model_dir={model_dir}", f"--train_file={sixteen_examples}", "--dev_file=none", "--method=freeze",
              "--freeze_trainable_layers=1", "--freeze_extra_modules=final_layernorm", "--learning_rate=1e-2",
              "--warmup_steps=0", "--lr_scheduler_type=constant", "--per_device_train_batch_size=8", "--max_steps=12",
              "--save_steps=6", "--logging_steps=3", "--report_to=none"]
    full, resumed, _ = train_then_resume(run_script, "train_trainer.py", tmp_path, common, 6, 12)
    # The checkpoint holds the trained tensors: block 1 (of 2) and the final norm, nothing frozen.
    saved = set(load_file(str(full / "checkpoint-6" / "model.safetensors")))
    assert saved and all(".layers.1." in name or "final_layernorm" in name for name in saved), sorted(saved)
    assert any(".layers.1.mlp." in name for name in saved) and "transformer.encoder.final_layernorm.weight" in saved
    losses = logged_losses(full, 12)
    assert losses[12] < 0.8 * losses[1], losses

    base = load_file(str(model_dir / "model.safetensors"))
    trained = load_file(str(full / "model" / "model.safetensors"))
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed == saved  # every trained tensor moved, nothing else did
    again = load_file(str(resumed / "model" / "model.safetensors"))
    for name in changed:
        torch.testing.assert_close(again[name], trained[name], atol=1e-6, rtol=1e-5, msg=name)
    model, _ = load_model_and_tokenizer(full / "model", dtype="fp32", device="cpu")  # a model folder like any base
    assert model.model_version == "chatglm2-6b"


@pytest.mark.parametrize("version,prefix", [("chatglm-6b", "transformer.layers."), ("chatglm3-6b", "transformer.encoder.layers.")])
def test_freeze_options_choose_blocks_and_modules_and_refuse_what_matches_nothing(version, prefix, trainable_models):
    model, _ = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device="cpu")
    trained = freeze_all_but(model, -1, "mlp", "word_embeddings")  # the first block's MLP and the embeddings
    assert trained and all(n.startswith(prefix + "0.mlp.") or "word_embeddings" in n for n in trained), trained
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)
    with pytest.raises(ValueError, match="the model has 2 blocks"):
        freeze_all_but(model, 3)
    with pytest.raises(ValueError, match="matches nothing in a block"):
        freeze_all_but(model, 1, "attention_typo")
    with pytest.raises(ValueError, match="match no parameter outside the blocks"):
        freeze_all_but(model, 1, "all", "lm_head_typo")

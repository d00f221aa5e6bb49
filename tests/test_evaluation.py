"""Evaluation in training (utils/trainer.py): once per evaluation point, the end included."""
import pytest
import torch
import transformers
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import REPO_ROOT
from utils.dataset import PaddingCollator
from utils.model_loading import load_model_and_tokenizer
from utils.trainer import Trainer, causal_prompts, load_datasets, shared_prefix_length, training_arguments
from utils.training_methods import add_lora
from utils.training_options import DEFAULTS


class LoraInputCasting(transformers.TrainerCallback):
    """Whether peft casts the LoRA layers' inputs to their weights' dtype, at every step (the Trainer's public hook)."""

    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.steps.append({layer.cast_input_dtype_enabled for layer in lora_layers(model)})


def lora_layers(model):
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


class EvaluationSteps(transformers.TrainerCallback):
    """The step of every evaluation, through the Trainer's public hook."""

    def __init__(self):
        self.steps = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def tiny_trainer(model_dir, data_file, output_dir, callbacks=(), dropout=0.0, dtype=torch.float32, **options):
    """Our Trainer on a tiny model with LoRA, training and evaluating on data_file, as train_trainer.py builds it
    (dtype bf16: the weights in bf16, the adapters in fp32, bf16 mixed precision)."""
    transformers.set_seed(0)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=dtype, device="cpu")
    model = add_lora(model, {**DEFAULTS["lora"], "dropout": dropout})  # 0: the same loss at every call in training mode
    config = {**DEFAULTS, "save_steps": 0, "report_to": "none", "per_device_train_batch_size": 4, "warmup_steps": 0,
              **options}
    args = training_arguments(config, output_dir, dtype, has_eval=True)
    train_data, eval_data = load_datasets(data_file, data_file, tokenizer, model.model_version)
    return Trainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                   data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=list(callbacks),
                   run_info={"script": "test", "config": config, "model_version": model.model_version})


@pytest.mark.parametrize("max_steps, evaluated_at", [(4, [2, 4]), (5, [2, 4, 5])])
def test_each_evaluation_point_is_evaluated_once(max_steps, evaluated_at, tiny_model_dirs, sixteen_examples, tmp_path):
    counted = EvaluationSteps()
    trainer = tiny_trainer(tiny_model_dirs["chatglm2-6b"], sixteen_examples, tmp_path, [counted], max_steps=max_steps,
                           eval_steps=2)
    trainer.train()
    final = trainer.final_evaluation()
    assert counted.steps == evaluated_at
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in logged] == evaluated_at
    # The run's final figures are those logged at the last step.
    assert final == {key: value for key, value in logged[-1].items() if key != "step"}
    assert final["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)


def test_evaluating_leaves_the_training_as_it_was(tiny_model_dirs, sixteen_examples, tmp_path):
    """Evaluation draws nothing from the random streams of training (LoRA dropout here): the training losses after an
    evaluation equal those of the same run without one. (transformers' own loop drew a seed for its data loader, so a
    run's result depended on how often it was evaluated.)"""
    losses = []
    for eval_steps in (2, 1000):
        trainer = tiny_trainer(tiny_model_dirs["chatglm2-6b"], sixteen_examples, tmp_path / str(eval_steps), dropout=0.3,
                               max_steps=4, eval_steps=eval_steps, logging_steps=1)
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def eval_loss_as_before(trainer, batch_size):
    """eval_loss as the Trainer's own loop gives it: the model's loss (mean over a batch's target tokens) of each
    batch of batch_size consecutive dev samples, weighted by the batch's samples."""
    data, total = trainer.eval_dataset, 0.0
    trainer.model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            total += trainer.model(**trainer.data_collator(batch)).loss.item() * len(batch)
    return total / len(data)


@pytest.fixture(scope="module")
def glm4_dirs(tmp_path_factory):
    """Tiny GLM-4 folders of both layouts (tools/tiny_models.py), their tokenizers trained on the demo data."""
    from tools.tiny_models import make_tiny_glm4
    from utils.records import read_instruction_records
    from utils.prompts import user_message

    records = read_instruction_records(REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "train.txt")
    texts = [f"{user_message(r)}\n{r['answer']}" for r in records]
    return {kind: make_tiny_glm4(tmp_path_factory.mktemp(kind) / "model", texts, model_type=kind)
            for kind in ("glm", "glm4")}


@pytest.mark.parametrize("model", ["chatglm-6b", "chatglm2-6b", "glm"])
def test_evaluation_in_length_batches_gives_the_eval_loss_of_the_trainers_loop(model, tiny_model_dirs, glm4_dirs,
                                                                                sixteen_examples, tmp_path):
    model_dir = glm4_dirs["glm"] if model == "glm" else tiny_model_dirs[model]
    trainer = tiny_trainer(model_dir, sixteen_examples, tmp_path, max_steps=2, eval_steps=100)
    trainer.train()  # LoRA weights that are not zero
    for eval_tokens in (64, 100_000):  # batches of one or two samples; all samples in one batch
        for batch_size in (1, 3, 4):
            trainer.eval_tokens, trainer.args.per_device_eval_batch_size = eval_tokens, batch_size
            assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_loss_as_before(trainer, batch_size), rel=1e-5)


@pytest.mark.parametrize("model", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm", "glm4"])
def test_evaluation_runs_the_shared_prompt_prefix_once_and_gives_the_eval_loss_of_whole_samples(model, tiny_model_dirs,
                                                                                              glm4_dirs,
                                                                                              sixteen_examples,
                                                                                              tmp_path):
    """Every MSRA sample begins with the same instruction: where prompts attend causally, evaluation runs those tokens
    once and each batch continues their cache, with the eval_loss of the samples run whole. ChatGLM-6B's prompt
    attends both ways (its tokens depend on what follows): it runs whole samples."""
    model_dir = glm4_dirs[model] if model in glm4_dirs else tiny_model_dirs[model]
    trainer = tiny_trainer(model_dir, sixteen_examples, tmp_path, max_steps=2, eval_steps=100)
    trainer.train()  # LoRA weights that are not zero
    prefix = trainer.shared_eval_prefix(trainer.eval_dataset)
    assert prefix == 0 if model == "chatglm-6b" else prefix >= 20
    losses = {}
    for share in (True, False):
        trainer.share_eval_prefix = share
        losses[share] = []
        for eval_tokens in (64, 100_000):  # batches of one or two samples; all samples in one batch
            trainer.eval_tokens = eval_tokens
            losses[share].append(trainer.evaluate()["eval_loss"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_only_models_whose_prompts_attend_causally_share_them(tiny_model_dirs, glm4_dirs):
    """ChatGLM-6B's prompt attends both ways, and a P-tuning model's cache begins with its prefix: neither shares."""
    for name, model_dir, options, shares in (("chatglm2", tiny_model_dirs["chatglm2-6b"], {}, True),
                                             ("chatglm3", tiny_model_dirs["chatglm3-6b"], {}, True),
                                             ("glm", glm4_dirs["glm"], {}, True),
                                             ("chatglm2 P-tuning", tiny_model_dirs["chatglm2-6b"], {"pre_seq_len": 4}, False),
                                             ("chatglm-6b", tiny_model_dirs["chatglm-6b"], {}, False)):
        model, _ = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu", **options)
        assert causal_prompts(model) is shares, name


def test_the_shared_prefix_ends_before_the_first_prediction_of_a_target_and_leaves_a_token():
    def example(ids, first_target):
        return {"input_ids": ids, "labels": [-100] * first_target + ids[first_target:]}

    assert shared_prefix_length([example([1, 2, 3, 4, 5], 4), example([1, 2, 3, 4, 6], 4)]) == 3  # 3 predicts 4
    assert shared_prefix_length([example([1, 2, 3, 4, 5], 5), example([1, 2, 3], 3)]) == 2  # one token left
    assert shared_prefix_length([example([1, 2, 3, 4, 5], 5), example([1, 7, 3, 4, 5], 5)]) == 1
    assert shared_prefix_length([example([1, 2], 2), example([9, 2], 2)]) == 0


@pytest.mark.parametrize("layout", ["glm", "glm4"])
def test_glm4_training_loss_is_chunked_and_equals_the_models_own(layout, glm4_dirs, sixteen_examples, tmp_path):
    trainer = tiny_trainer(glm4_dirs[layout], sixteen_examples, tmp_path, max_steps=2, eval_steps=100)
    trainer.train()  # LoRA weights that are not zero
    model, batch = trainer.model, trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    targets = int((batch["labels"][:, 1:] != -100).sum())
    trainer.loss_chunk_rows = 16
    assert targets > 3 * trainer.loss_chunk_rows
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    expected = model(**batch).loss
    expected_grads = torch.autograd.grad(expected, trained)
    logit_rows = []
    head = model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, output: logit_rows.append(output.shape[:-1].numel()))
    try:
        loss = trainer.compute_loss(model, batch)
        grads = torch.autograd.grad(loss, trained)
    finally:
        hook.remove()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    # The output layer saw the last position of each row (8 rows) and chunks of target rows, forward and backward.
    assert max(logit_rows) == trainer.loss_chunk_rows and sum(logit_rows) == 8 + 2 * targets, logit_rows


def test_bf16_training_takes_lora_inputs_uncast_and_loses_exactly_as_when_they_are_cast(tiny_model_dirs, sixteen_examples,
                                                                                       tmp_path):
    """Under bf16 mixed precision (autocast, here on the CPU) our Trainer lets peft's LoRA layers take their bf16
    inputs as they are (no fp32 copy for autocast to cast back): the losses of every step and the evaluation equal
    those of the Trainer's own train(), where peft casts them; the casting is back on after training. (Without LoRA
    dropout: the CPU's bf16 dropout rounds its 1 / (1 - p) to bf16, where CUDA's scales in fp32.)"""
    options = dict(max_steps=3, eval_steps=100, logging_steps=1, dropout=0.0, dtype=torch.bfloat16)
    seen = LoraInputCasting()
    ours = tiny_trainer(tiny_model_dirs["chatglm2-6b"], sixteen_examples, tmp_path / "ours", callbacks=[seen], **options)
    ours.train()
    reference = tiny_trainer(tiny_model_dirs["chatglm2-6b"], sixteen_examples, tmp_path / "reference", **options)
    transformers.Trainer.train(reference)
    assert ours.accelerator.mixed_precision == "bf16" and {p.dtype for p in ours.model.parameters() if p.requires_grad} == {torch.float32}
    assert seen.steps == [{False}] * 3
    assert all(layer.cast_input_dtype_enabled for layer in lora_layers(ours.model))
    losses = [[entry["loss"] for entry in trainer.state.log_history if "loss" in entry] for trainer in (ours, reference)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert ours.evaluate()["eval_loss"] == reference.evaluate()["eval_loss"]

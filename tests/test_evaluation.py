"""Evaluation in training (utils/trainer.py): once per evaluation point, the end included."""
import pytest
import torch
import transformers

from utils.dataset import PaddingCollator
from utils.model_loading import load_model_and_tokenizer
from utils.trainer import Trainer, load_datasets, training_arguments
from utils.training_methods import add_lora
from utils.training_options import DEFAULTS


class EvaluationSteps(transformers.TrainerCallback):
    """The step of every evaluation, through the Trainer's public hook."""

    def __init__(self):
        self.steps = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def tiny_trainer(model_dir, data_file, output_dir, callbacks=(), **options):
    """Our Trainer on a tiny model with LoRA, training and evaluating on data_file, as train_trainer.py builds it."""
    transformers.set_seed(0)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu")
    model = add_lora(model, DEFAULTS["lora"])
    config = {**DEFAULTS, "save_steps": 0, "report_to": "none", "per_device_train_batch_size": 4, "warmup_steps": 0,
              **options}
    args = training_arguments(config, output_dir, torch.float32, has_eval=True)
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

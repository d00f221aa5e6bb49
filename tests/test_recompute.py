"""--recompute_mlp_blocks: the MLPs of the first N blocks keep their input only and make their up-projection's output
again in backward, on every model kind (ChatGLM-6B's GELU MLP, ChatGLM2/3's and GLM-4's SwiGLU), with the gradients
of the run that keeps everything."""
import pytest
import torch

from conftest import REPO_ROOT
from tools.tiny_models import make_tiny_glm4
from utils.config_utils import ConfigError
from utils.model_loading import load_model_and_tokenizer
from utils.prompts import user_message
from utils.records import read_instruction_records
from utils.training_methods import load_model_to_train
from utils.training_options import DEFAULTS

DEMO_TRAIN = REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "train.txt"


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs, tmp_path_factory):
    texts = [f"{user_message(r)}\n{r['answer']}" for r in read_instruction_records(DEMO_TRAIN)]
    return {**tiny_model_dirs, "glm-4": make_tiny_glm4(tmp_path_factory.mktemp("glm") / "model", texts, model_type="glm")}


def up_projections(model):
    """The first linear layer of every MLP that can recompute, in block order."""
    mlps = [module for module in model.modules() if hasattr(module, "recompute_activation")]
    return [getattr(mlp, "gate_up_proj", None) or mlp.dense_h_to_4h for mlp in mlps]


@pytest.mark.parametrize("kind", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4"])
def test_recomputed_mlps_run_their_up_projection_again_and_give_the_same_gradients(kind, model_dirs):
    """--recompute_mlp_blocks=1: the first block's MLP runs its up-projection again in backward, the second's does
    not; the loss and every gradient (LoRA with dropout on every linear layer: the masks drawn again alike) equal those
    of the run that keeps everything, bit for bit. More blocks than the model has is refused."""
    config = {**DEFAULTS, "model_dir": str(model_dirs[kind]),
              "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all"}}
    _, tokenizer = load_model_and_tokenizer(model_dirs[kind], dtype="fp32", device="cpu")
    ids = tokenizer(["蒋玲帆傍晚从佛山回来。", "中国的首都是北京"], padding=True, return_tensors="pt")["input_ids"]
    runs = []
    for blocks in (0, 1):
        model, _ = load_model_to_train({**config, "recompute_mlp_blocks": blocks}, torch.float32, "cpu")
        model.train()
        calls = []
        for index, linear in enumerate(up_projections(model)):
            linear.register_forward_hook(lambda *_, index=index: calls.append(index))
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((calls, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (calls, loss, grads), (recomputed_calls, recomputed_loss, recomputed_grads) = runs
    assert calls == [0, 1] and recomputed_calls == [0, 1, 0]
    assert torch.equal(recomputed_loss, loss) and grads.keys() == recomputed_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(recomputed_grads[name], grad), name
    with pytest.raises(ConfigError, match="recompute_mlp_blocks=3, but the model has 2 blocks whose MLP can recompute"):
        load_model_to_train({**config, "recompute_mlp_blocks": 3}, torch.float32, "cpu")

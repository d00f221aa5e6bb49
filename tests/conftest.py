import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
TOKENIZERS = SHARED / "assets" / "tokenizers"
VERSIONS = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")

sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """One tiny random model folder per version, in the official layout with our .py files copied in."""
    from utils.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {version: make_tiny_model(version, root / version, TOKENIZERS / version, seed=0) for version in VERSIONS}


@pytest.fixture(scope="session")
def sixteen_examples(tmp_path_factory):
    """The 16 shortest records of the MSRA instruction file in ../shared (real sentences and entities)."""
    lines = (SHARED / "data" / "msra" / "instruct_data" / "dev.txt").read_text(encoding="utf-8").splitlines()
    lines = sorted(lines, key=len)[:16]
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trainable_models(tmp_path_factory):
    """Tiny models whose random output layer can express confident predictions: with the default 0.02 init, a
    64-wide final RMSNorm times a frozen random output layer caps every logit near 1, so nothing can be learned."""
    from utils.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("trainable")
    return {v: make_tiny_model(v, root / v, TOKENIZERS / v, seed=0, initializer_range=0.3) for v in VERSIONS}

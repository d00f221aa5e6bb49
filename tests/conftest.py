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

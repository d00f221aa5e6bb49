"""Our model files (`remote_scripts/<version>/`), imported as packages of their own: each folder stands alone and uses
relative imports, as it does when copied next to a checkpoint's weights."""
import importlib
import importlib.util
import sys
from pathlib import Path

REMOTE_SCRIPTS = Path(__file__).resolve().parents[1] / "remote_scripts"
VERSIONS = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")


def remote_module(version: str, name: str):
    """`remote_scripts/<version>/<name>.py` imported as a submodule of its folder (the files use relative imports)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown ChatGLM version {version!r}; expected one of {VERSIONS}")
    package = "chatglm_remote_" + version.replace("-", "_")
    if package not in sys.modules:
        folder = REMOTE_SCRIPTS / version
        spec = importlib.util.spec_from_file_location(package, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")

"""The shape the code keeps (issue 27): utils/ imports flow one way, functions stay short, the product does not reach
into the interpreter's or a library's private machinery, and the model files hold the model, not the decode engine."""
import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO_ROOT.glob("*.py"))
UTILS = sorted((REPO_ROOT / "utils").glob("*.py"))
MODEL_FILES = sorted((REPO_ROOT / "remote_scripts").glob("*/*.py"))
MAX_FUNCTION_LINES = 80


def utils_imports(path):
    """The utils modules that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "utils":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from utils import x
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("utils."))
    return found - {"__init__"}


def test_utils_imports_have_no_cycle():
    graph = {path.stem: utils_imports(path) for path in UTILS}
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle in utils/: " + " -> ".join(cycle))
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def long_functions(paths):
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions(SCRIPTS + UTILS + MODEL_FILES) == []


def test_the_product_uses_no_mock_and_no_private_interpreter_hooks():
    banned = ("unittest.mock", "from unittest import mock", "threading._shutdown", "atexit._run_exitfuncs")
    places = [f"{path.relative_to(REPO_ROOT)}: {word}" for path in SCRIPTS + UTILS + MODEL_FILES
              for word in banned if word in path.read_text(encoding="utf-8")]
    places += [f"{path.relative_to(REPO_ROOT)}: {word}" for path in (REPO_ROOT / "tests").glob("*.py")
               for word in banned[2:] if word in path.read_text(encoding="utf-8") and path.name != Path(__file__).name]
    assert places == []


def test_the_model_files_hold_no_cuda_graph_code():
    words = ("CUDAGraph", "cuda.graph", "graph_pool")
    places = [f"{path.relative_to(REPO_ROOT)}: {word}" for path in MODEL_FILES for word in words
              if word in path.read_text(encoding="utf-8")]
    assert places == []


def test_every_script_works_in_main_and_nothing_at_import():
    """A script's module level holds imports, constants, functions and classes; the work starts in main() under
    `if __name__ == "__main__":`."""
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    found = []
    for path in SCRIPTS:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # the docstring
            if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
                continue
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                called = ast.unparse(node.value.func)
                if not any(called.startswith(name) for name in ("dict", "re.compile", "Path", "frozenset", "set", "tuple",
                                                             "logging.getLogger")):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
                continue
            if not isinstance(node, allowed):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{path.name}: no main()"
    assert found == []

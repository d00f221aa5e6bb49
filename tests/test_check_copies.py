"""tools/check_copies.py: the copies across remote_scripts/<version>/ equal their sources, and --fix rewrites them.

The edits are made in a copy of remote_scripts/ under tmp_path, never in the real files. Only the standard library
runs here (no torch), so the whole file takes about a second.
"""
import ast
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, VERSIONS
from tools import check_copies

V2_MODELING = "remote_scripts/chatglm2-6b/modeling_chatglm.py"
V3_MODELING = "remote_scripts/chatglm3-6b/modeling_chatglm.py"
V1_MODELING = "remote_scripts/chatglm-6b/modeling_chatglm.py"
# What ChatGLM3's files define differently from ChatGLM2's (same names); everything else they share is marked.
V3_DIFFERS = {
    "modeling_chatglm.py": {f"ChatGLMForConditionalGeneration.{name}"
                            for name in ("process_response", "_chat_inputs", "stream_chat", "chat")},
    "configuration_chatglm.py": set(),
    "tokenization_chatglm.py": {"SPECIAL_TOKENS", "ChatGLMTokenizer.__init__", "ChatGLMTokenizer.get_command",
                                "ChatGLMTokenizer._tokenize", "ChatGLMTokenizer.convert_tokens_to_string"},
}


@pytest.fixture
def root(tmp_path):
    shutil.copytree(REPO_ROOT / "remote_scripts", tmp_path / "remote_scripts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def run_check(root, capsys, *args):
    code = check_copies.main(["--root", str(root), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


def test_the_repository_passes_the_check():
    result = subprocess.run([sys.executable, "tools/check_copies.py"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"kernels.py", "quantization.py"} <= set(check_copies.WHOLE_FILES)


def test_an_edited_copy_fails_naming_file_and_definition_and_fix_restores_it(root, capsys):
    originals = {rel: (root / rel).read_bytes() for rel in (V3_MODELING, V1_MODELING)}
    # A method of a class that is not copied as a whole, and a module-level function.
    edit(root / V3_MODELING, "return positions.add_(1)", "return positions.add_(2)")
    edit(root / V1_MODELING, "    capacity = 256\n", "    capacity = 512\n")
    code, out = run_check(root, capsys)
    assert code == 1
    assert (f"{V3_MODELING}:" in out and "ChatGLMForConditionalGeneration.advance_positions (copied from "
            f"{V2_MODELING}:ChatGLMForConditionalGeneration.advance_positions): differs" in out), out
    assert f"{V1_MODELING}:" in out
    assert f"static_cache_capacity (copied from {V2_MODELING}:static_cache_capacity)" in out
    assert "+        return positions.add_(2)" in out and "-        return positions.add_(1)" in out
    assert out.count("differs from its source") == 2 and "--fix" in out

    code, out = run_check(root, capsys, "--fix")
    assert code == 0, out
    assert {rel: (root / rel).read_bytes() for rel in originals} == originals
    assert run_check(root, capsys) == (0, "")


def test_fix_carries_a_changed_source_into_its_copies(root, capsys):
    edit(root / V2_MODELING, "torch.rsqrt(hidden_fp32.pow(2)", "1 / torch.sqrt(hidden_fp32.pow(2)")
    code, out = run_check(root, capsys)
    assert code == 1 and f"{V3_MODELING}:" in out and "rms_norm (copied from" in out, out
    assert "chatglm-6b" not in out  # ChatGLM-6B uses LayerNorm: nothing of it is marked as a copy of rms_norm
    assert run_check(root, capsys, "--fix")[0] == 0
    assert "1 / torch.sqrt(hidden_fp32.pow(2)" in (root / V3_MODELING).read_text()
    assert run_check(root, capsys) == (0, "")


def test_an_edited_or_missing_whole_file_copy_fails_and_fix_restores_it(root, capsys):
    source = (root / "remote_scripts/chatglm2-6b/quantization.py").read_bytes()
    with open(root / "remote_scripts/chatglm-6b/quantization.py", "a") as f:
        f.write("# a local change\n")
    (root / "remote_scripts/chatglm3-6b/kernels.py").unlink()
    code, out = run_check(root, capsys)
    assert code == 1
    assert "remote_scripts/chatglm-6b/quantization.py: whole file differs from its source " \
           "remote_scripts/chatglm2-6b/quantization.py" in out, out
    assert "+# a local change" in out
    assert ("remote_scripts/chatglm3-6b/kernels.py: whole-file copy of remote_scripts/chatglm2-6b/kernels.py "
            "is missing") in out

    assert run_check(root, capsys, "--fix")[0] == 0
    assert (root / "remote_scripts/chatglm-6b/quantization.py").read_bytes() == source
    assert (root / "remote_scripts/chatglm3-6b/kernels.py").read_bytes() == \
           (root / "remote_scripts/chatglm2-6b/kernels.py").read_bytes()
    assert run_check(root, capsys) == (0, "")


def test_a_broken_marker_fails_and_fix_cannot_hide_it(root, capsys):
    marker = f"# Copied from {V2_MODELING}:swiglu\n"
    edit(root / V3_MODELING, marker, f"# Copied from {V2_MODELING}:swiglu_renamed\n")
    edit(root / V1_MODELING, f"# Copied from {V2_MODELING}:StaticCacheRef\n",
         f"# Copied from {V2_MODELING}:StaticCacheRef\n# a comment in between\n")
    for args in ((), ("--fix",)):
        code, out = run_check(root, capsys, *args)
        assert code == 1
        assert "swiglu_renamed" in out and "no such definition in the source" in out, out
        assert f"marker for {V2_MODELING}:StaticCacheRef is not directly above a class, def or NAME = ..." in out


def marked_names(path):
    """Dotted names of the definitions in `path` that a marker covers (itself or a class around it)."""
    lines = check_copies.read_lines(path)
    defs = check_copies.definitions(lines)
    starts = {index + 1 for index, line in enumerate(lines) if check_copies.MARKER.match(line)}
    marked = {d.name for d in defs.values() if d.start in starts}
    return {name for name in defs if any(name == m or name.startswith(m + ".") for m in marked)}


@pytest.mark.parametrize("name", sorted(V3_DIFFERS))
def test_chatglm3_marks_everything_it_shares_with_chatglm2(name):
    v2 = set(check_copies.definitions(check_copies.read_lines(REPO_ROOT / "remote_scripts/chatglm2-6b" / name)))
    v3 = REPO_ROOT / "remote_scripts/chatglm3-6b" / name
    shared = set(check_copies.definitions(check_copies.read_lines(v3))) & v2
    unmarked = shared - marked_names(v3)
    # A class that holds a differing method is itself unmarked; its other methods are marked one by one.
    unmarked = {n for n in unmarked if not any(d.startswith(n + ".") for d in V3_DIFFERS[name])}
    assert unmarked == V3_DIFFERS[name]


@pytest.mark.parametrize("version", VERSIONS)
def test_version_folders_import_nothing_from_this_repository(version):
    """Each folder is copied next to the weights on its own: only relative imports of its own files and installed
    packages (a `# Copied from` marker is a comment, nothing is imported from its source)."""
    folder = REPO_ROOT / "remote_scripts" / version
    own = {path.stem for path in folder.glob("*.py")}
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and (node.module or "").split(".")[0] in own, (path, ast.unparse(node))
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert name.split(".")[0] not in {"utils", "remote_scripts", "tests"}, (path, name)

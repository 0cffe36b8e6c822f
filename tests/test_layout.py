"""The shape of ``src/``: imports point one way, and every function fits on a screen.

A reader goes from the tokenizer up to the commands; a module may build on the ones below it and
never on one above, or the chapters could not be read in order. ``ORDER`` is that order, from the
bottom: the support modules every part shares, the chapters' library modules, then the commands.
"""

import ast

from conftest import REPO

ORDER = [
    "errors", "files",  # what every part shares: the user's mistakes, file chores
    "tokenizer", "data",  # text -> token ids -> batches
    "fused_softmax", "flash_attention", "attention", "model", "flops",  # kernels, the GPT, its cost
    "training", "checkpoints",  # how a model takes a step; its state on disk
    "gpt2", "llama", "lora",  # published weights (GPT-2; Llama, Qwen); low-rank adapters
    "quantize",  # int8 / int4 weights
    "cli",  # what the commands share
    "generate", "train", "finetune", "classify", "instruct",  # the commands
]  # fmt: skip
# Argument-parser builders are long lists of flags, one per line: the 60-line rule spares them.
PARSER_BUILDERS = {"build_parser", "add_finetune_arguments"}


def src_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """The ``src`` modules a module imports, anywhere in it, with the line of each import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "src":
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src."):
            found.append((node.module.split(".")[1], node.lineno))
        elif isinstance(node, ast.Import):
            found += [
                (a.name.split(".")[1], node.lineno) for a in node.names if a.name.startswith("src.")
            ]
    return found


def modules() -> dict[str, ast.Module]:
    return {
        p.stem: ast.parse(p.read_text())
        for p in sorted((REPO / "src").glob("*.py"))
        if p.stem != "__init__"
    }


def test_every_module_has_a_place_in_the_order():
    assert sorted(modules()) == sorted(ORDER)


def test_no_module_imports_one_above_it():
    wrong = []
    for name, tree in modules().items():
        for imported, line in src_imports(tree):
            if ORDER.index(imported) >= ORDER.index(name):
                wrong.append(f"src/{name}.py:{line} imports src.{imported}, which comes after it")
    assert not wrong, wrong


def test_the_checker_catches_an_upward_import():
    tree = ast.parse("from src.cli import Parser\nimport src.train\nfrom src import model\n")
    assert src_imports(tree) == [("cli", 1), ("train", 2), ("model", 3)]


def test_the_generation_library_imports_only_the_model():
    """src/generate.py is a chapter library with a command line on top: at module level it may
    import only what lies below the model; its command line imports the rest when it runs."""
    tree = modules()["generate"]
    top = [(n, line) for n, line in src_imports(ast.Module(body=tree.body, type_ignores=[]))
           if not any(line in range(f.lineno, f.end_lineno + 1) for f in tree.body
                      if isinstance(f, ast.FunctionDef))]  # fmt: skip
    assert top and all(ORDER.index(n) <= ORDER.index("model") for n, _ in top), top


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name not in PARSER_BUILDERS:
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"src/{name}.py:{node.lineno} {node.name}: {length} lines")
    assert not long, long

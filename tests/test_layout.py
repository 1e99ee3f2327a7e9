"""The package's shape, read from the source: imports run one way between the folders of concerns, no module
imports itself back through others, no module outgrows one sitting, and nothing rewrites a module's class or hooks
the whole process at import. Imports inside functions and under TYPE_CHECKING count: a cycle hidden in a function
is still a cycle for the reader."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hilt"

# lowest first: a module may import its own folder and the folders of lower ranks, never a higher rank or another
# folder of its own rank
RANKS = [
    ("hilt.errors",),
    ("hilt.files", "hilt.device", "hilt.memory"),  # leaves
    ("hilt.model",),  # what a checkpoint rebuilds; imports torch only
    ("hilt.data",),
    ("hilt.checkpoint",),
    ("hilt.training", "hilt.generation"),
    ("hilt.evaluation",),
    ("hilt.hf", "hilt.serve"),
    ("hilt.cli",),
    ("hilt.__main__", "hilt"),  # `python -m hilt`, and the package's lazy names
]
MAX_LINES = 400


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The hilt modules ``name`` imports anywhere in its source, each resolved to the module it names."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            prefix = ".".join([*base, node.module] if node.module else base)
            submodules = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in modules]
            targets = submodules + ([prefix] if len(submodules) < len(node.names) else [])
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def folder(name: str) -> str:
    """The folder of concern a module belongs to (hilt.model.layers -> hilt.model; leaves are their own)."""
    for rank in RANKS:
        for top in rank:
            if name == top or name.startswith(top + "."):
                return top
    raise AssertionError(f"{name} belongs to no folder of RANKS: place it")


def rank(name: str) -> int:
    top = folder(name)
    return next(i for i, tops in enumerate(RANKS) if top in tops)


def test_every_module_imports_only_its_own_folder_and_lower_ranks():
    wrong = [
        f"{name} -> {target}"
        for name, targets in graph().items()
        for target in targets
        if folder(target) != folder(name) and rank(target) >= rank(name)
    ]
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_imports_inside_functions_and_type_checking():
    modules = {"hilt.a": Path("a"), "hilt.b": Path("b"), "hilt.c": Path("c"), "hilt": Path("__init__.py")}
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hilt import b\ndef f():\n    from .c import x\n"
    path = Path("/tmp/hilt_layout_probe/a.py")
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    assert imports("hilt.a", path, modules) == {"hilt.b", "hilt.c"}


def test_no_module_outgrows_one_sitting():
    long = {n: len(p.read_text().splitlines()) for n, p in module_names().items()}
    assert not {n: lines for n, lines in long.items() if lines > MAX_LINES}


def test_nothing_rewrites_a_class_or_hooks_the_process_at_import():
    for name, path in module_names().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                assert not any(
                    isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets
                ), name
        for node in tree.body:  # statements that run at import
            call = node.value if isinstance(node, ast.Expr) else None
            if isinstance(call, ast.Call):
                func = (
                    call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
                )
                assert not func.startswith("register_"), f"{name} registers {func} at import"

"""The package's import structure (docs/design.md, "Module map"): no cycles, nothing imports upwards.

Every import counts, including those inside functions (a function-level import only hides a cycle),
except type-checking-only ones (``if TYPE_CHECKING:``), which never run.
"""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "spam_hf")


def module_name(path):
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph():
    """``{module: {imported spam_hf modules}}`` over every ``.py`` file of the package."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
    modules = {module_name(f): f for f in files}
    graph = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(open(path).read())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [m, n])
                                     if n in stack else f"import cycle through {m} -> {n}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_nothing_imports_upwards():
    """The CLI is imported by nothing; the jobs only by the CLI; the trainer only by the jobs (and the
    package root's public API); export, pruning and the posterior never import the layers above them."""
    graph = import_graph()
    above = {"spam_hf.cli": set(), "spam_hf.jobs": {"spam_hf.cli"}, "spam_hf.trainer": {"spam_hf"}}
    for m, edges in graph.items():
        for target, allowed in above.items():
            hits = {e for e in edges if e == target or e.startswith(target + ".")}
            if hits and not (m == target or m.startswith(target + ".") or m in allowed or
                             (target == "spam_hf.trainer" and m.startswith("spam_hf.jobs"))):
                raise AssertionError(f"{m} imports {sorted(hits)} from above it")
    for low in ("spam_hf.pruning", "spam_hf.posterior", "spam_hf.export", "spam_hf.architectures"):
        for m, edges in graph.items():
            if m == low or m.startswith(low + "."):
                assert not {e for e in edges if e.startswith(("spam_hf.jobs", "spam_hf.trainer", "spam_hf.cli"))}, m
    # families hold their own runtime modules: nothing in architectures/ imports export/
    for m, edges in graph.items():
        if m.startswith("spam_hf.architectures"):
            assert not {e for e in edges if e.startswith("spam_hf.export")}, m


def test_arguments_are_a_leaf():
    """The argument declarations read only the choice lists and the checks (so parsing and --help need no torch);
    those two import nothing of the package; the job policy lives in jobs/, not beside the declarations."""
    graph = import_graph()
    assert graph["spam_hf.arguments"] <= {"spam_hf.checks", "spam_hf.choices"}, graph["spam_hf.arguments"]
    assert graph["spam_hf.choices"] == set() and graph["spam_hf.checks"] == set()
    source = open(os.path.join(PACKAGE, "arguments.py")).read()
    assert "import torch" not in source and "from transformers" not in source and "def resolve_" not in source

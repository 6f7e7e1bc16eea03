"""The package's layout: stages stand on a small core, and nothing imports in a circle.

Every import counts, function-level ones included (they exist only to keep `compress --help`
free of torch, not to hide a cycle). A new cycle, a core module reaching up into a stage, or a
module importing another's private name fails here with the offending imports named.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import compressor

ROOT = Path(compressor.__file__).parent

#: The core every stage may use; it imports no stage.
CORE = {"errors", "io", "config", "record", "contract", "fidelity", "layer_groups", "render", "hub", "onnx", "grids", "adapters", "models", "data",
        "progress"}
#: The stages (one subpackage each): siblings on the core, none imports another (but `SIBLING_EDGES`).
STAGES = {"analysis", "evaluation", "sharing", "pruning", "finetune", "quantization", "export"}
#: What runs stages: the report (every stage side by side) and recipes / batches.
TOP = {"report", "pipeline"}
#: The one stage-to-stage import allowed: export quantizes what it exports.
SIBLING_EDGES = {("export", "quantization")}


def module_name(path: Path) -> str:
    parts = ["compressor", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every import in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
    return [(m, n, line) for m, n, line in found if m in modules]


def imports_of_file(path: Path, modules: set[str]) -> list[tuple[str, str, int]]:
    """The absolute imports of ``compressor`` in a file outside the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("compressor"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (node.module, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m in modules]


def graph():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    edges = {m: imports(p, modules) for m, p in files.items()}
    return files, edges


def subpackage(module: str) -> str:
    return module.split(".")[1] if "." in module else "compressor"


def find_cycle(nodes, successors) -> list[str] | None:
    """One cycle of the directed graph, as a path that returns to its start; ``None`` if none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(successors(n)):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(nodes):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_every_subpackage_has_a_layer():
    files, _ = graph()
    assert {subpackage(m) for m in files} - {"compressor"} == CORE | STAGES | TOP


def test_no_import_cycle_between_subpackages():
    _, edges = graph()
    arrows = defaultdict(set)
    for m, targets in edges.items():
        for t, _, _ in targets:
            if subpackage(m) != subpackage(t):
                arrows[subpackage(m)].add(subpackage(t))
    cycle = find_cycle(set(arrows), lambda n: arrows.get(n, ()))
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_modules():
    _, edges = graph()
    cycle = find_cycle(set(edges), lambda n: {t for t, _, _ in edges[n] if t != n})
    assert cycle is None, " -> ".join(cycle)


def test_core_imports_no_stage():
    _, edges = graph()
    upward = [f"{m}:{line} imports {t}" for m, targets in edges.items() if subpackage(m) in CORE
              for t, _, line in targets if subpackage(t) not in CORE]
    assert not upward, upward


def test_stages_do_not_import_what_runs_them():
    _, edges = graph()
    upward = [f"{m}:{line} imports {t}" for m, targets in edges.items() if subpackage(m) in STAGES
              for t, _, line in targets if subpackage(t) in TOP]
    assert not upward, upward


def test_no_stage_imports_another_stage():
    """What two stages need lives in the core; a stage that uses another's result is composed
    above both (`compressor.pipeline.compose`)."""
    _, edges = graph()
    across = [f"{m}:{line} imports {t}" for m, targets in edges.items() if subpackage(m) in STAGES
              for t, _, line in targets if subpackage(t) in STAGES and subpackage(t) != subpackage(m)
              and (subpackage(m), subpackage(t)) not in SIBLING_EDGES]
    assert not across, across


def test_no_module_imports_a_private_name_of_another():
    files, edges = graph()
    modules = set(files)
    # the CLI, the tests and the benchmarks use the library's public names too
    for folder in ("cli", "tests", "benchmarks"):
        for path in (ROOT.parent / folder).rglob("*.py"):
            edges[f"{folder}/{path.name}"] = imports_of_file(path, modules)
    private = [f"{m}:{line} imports {t}.{name}" for m, targets in edges.items()
               for t, name, line in targets if name.startswith("_") and not name.startswith("__") and t != m]
    assert not private, private


def test_the_cycle_finder_finds_a_cycle():
    arrows = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(arrows, lambda n: arrows.get(n, ())) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}, lambda n: {"a": {"b"}}.get(n, ())) is None


def test_help_imports_no_torch():
    """`compress --help` and every command's help stay instant: torch loads only when a model does."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from cli.main import cli; "
            "[CliRunner().invoke(cli, [c, '--help']) for c in [None, *cli.commands] if c] ; "
            "CliRunner().invoke(cli, ['--help']); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


#: Calls that rewrite an ONNX graph: building nodes or attributes, or editing a graph's lists.
_GRAPH_BUILDERS = {"make_node", "make_attribute", "make_opsetid", "make_graph", "make_model", "CopyFrom"}
_GRAPH_LISTS = {"node", "initializer", "opset_import", "attribute", "input", "output"}


def graph_rewrites(path: Path) -> list[tuple[int, str]]:
    """``(line, what)`` for every ONNX graph rewrite in ``path``: a node, attribute or model
    built, a tensor copied over, a graph's node / initializer / opset list edited or cut."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, owner = node.func.attr, node.func.value
            if attr in _GRAPH_BUILDERS:
                found.append((node.lineno, attr))
            elif attr in {"append", "extend", "insert", "remove", "pop"} and isinstance(owner, ast.Attribute) \
                    and owner.attr in _GRAPH_LISTS and isinstance(owner.value, ast.Attribute | ast.Name) \
                    and (getattr(owner.value, "attr", None) == "graph" or owner.attr == "attribute"):
                found.append((node.lineno, f"{owner.attr}.{attr}"))
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) \
                        and target.value.attr in _GRAPH_LISTS:
                    found.append((node.lineno, f"del {target.value.attr}[...]"))
    return sorted(found)


def test_onnx_graph_passes_live_in_compressor_onnx():
    """Every rewrite of an exported graph is a pass in `compressor.onnx` (one home, each tested
    there); stages call passes, they do not edit graphs themselves."""
    outside = [f"{path.relative_to(ROOT.parent)}:{line} {what}" for path in ROOT.rglob("*.py")
               if "onnx" not in path.relative_to(ROOT).parts[:1] for line, what in graph_rewrites(path)]
    assert not outside, outside


def test_the_graph_rewrite_finder_finds_rewrites(tmp_path):
    code = tmp_path / "m.py"
    code.write_text("import onnx\ndef f(model, node):\n    model.graph.node.insert(0, node)\n"
                    "    node.attribute.append(onnx.helper.make_attribute('a', 1))\n    del model.graph.initializer[:]\n"
                    "    items = []\n    items.append(1)\n")
    assert graph_rewrites(code) == [(3, "node.insert"), (4, "attribute.append"), (4, "make_attribute"),
                                    (5, "del initializer[...]")]

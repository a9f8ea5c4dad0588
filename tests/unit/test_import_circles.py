"""No import circle through the layer / operator modules (issue 24, item 4).

Read from the source with ``ast``, so an import inside a function counts as much as one at the
top of a module: ``recompute.attach_sources`` imports ``layers`` inside the function, and
``ops`` used to import ``recompute`` for ``Recipe``, which made
``layers -> ops -> recompute -> layers`` a circle.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_lora"
# The modules of the forward path: none may sit on an import circle.
FORWARD_PATH = ("core.layers", "core.ops", "core.recompute", "core.external_gemm", "core.layer_forward",
                "core.shard_merge", "core.sharded_state", "core.inject")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """Module -> the package modules it imports anywhere in its source (``a.b`` names, no prefix)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for full in found:
                if full.startswith("megatron_lora."):
                    short = full[len("megatron_lora."):]
                    if short in modules:
                        targets.add(short)
        targets.discard(name)
        graph[name] = targets
    return graph


def circles_through(graph: dict, start: str) -> list:
    """Every simple import path from ``start`` back to itself (depth-first)."""
    found, stack = [], [(start, [start])]
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                found.append(path + [start])
            elif nxt not in path:
                stack.append((nxt, path + [nxt]))
    return found


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "core.layers" in graph["core.recompute"], "attach_sources imports layers inside the function"
    assert "core.ops" in graph["core.layers"]


def test_no_import_circle_through_the_forward_path():
    graph = import_graph()
    circles = {m: circles_through(graph, m) for m in FORWARD_PATH if m in graph}
    assert not any(circles.values()), {m: [" -> ".join(c) for c in cs] for m, cs in circles.items() if cs}

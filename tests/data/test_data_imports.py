"""The modules of `hybrid_detr.data` form a one-way graph: no two import each other, directly or
through others, not even inside a function (`registration` uses `validation`; `checked` uses both)."""
import ast
import os

import hybrid_detr.data

DATA_DIR = os.path.dirname(hybrid_detr.data.__file__)


def _sibling_imports(path, siblings):
    """The modules of hybrid_detr.data that `path` imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.partition("hybrid_detr.data.")[2]]
        elif isinstance(node, ast.Import):
            names = [alias.name.partition("hybrid_detr.data.")[2] for alias in node.names]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name and name.split(".")[0] in siblings)
    return found


def test_data_modules_import_each_other_one_way():
    siblings = {f[:-3] for f in os.listdir(DATA_DIR) if f.endswith(".py") and f != "__init__.py"}
    graph = {m: _sibling_imports(os.path.join(DATA_DIR, m + ".py"), siblings) for m in siblings}
    assert "validation" in graph["registration"] and {"registration", "validation"} <= graph["checked"]

    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)

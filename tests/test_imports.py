"""The package's import graph, read from the source with ``ast``: no cycle, and every
arrow points down the layers (core <- formats <- models <- serve <- training <- cli).

Every import counts, those inside functions too: a cycle held open by a function-level
import is still a cycle for whoever reads the code. Imports under ``if TYPE_CHECKING``
(annotations only) do not count."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "lorakit"

# The layer of each module, by its dotted name under lorakit (a package's name covers
# everything in it). A module may import from its own layer or lower ones.
LAYERS = {
    # the core: torch, safetensors and huggingface_hub only
    "config": 0, "adapter": 0, "layouts": 0, "frozen": 0, "hub": 0, "quiet": 0, "layers": 0, "bnb": 0, "experts": 0,
    "variants": 0, "attach": 0, "merge": 0, "quantize": 0,
    # adapters as files
    "formats": 1, "files": 1,
    # models and adapter algebra
    "pretrained": 2, "combine": 2, "analyze": 2, "pipelines": 2, "plan": 2, "report": 2, "llamacpp": 2,
    # the applications: serving, and training, whose RL rollouts decode with serving's engine
    "serve": 3, "training": 4,
    "cli": 5, "__main__": 5,
}


def module_files() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["lorakit", *parts])] = path
    return found


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lorakit modules ``name`` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names if alias.name in modules)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)

    Visitor().visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def layer(name: str) -> int | None:
    parts = name.split(".")[1:]
    return LAYERS.get(parts[0]) if parts else None  # the package itself is the facade


def test_every_module_has_a_layer():
    assert [m for m in graph() if m != "lorakit" and layer(m) is None] == []


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_has_no_cycle():
    cycles = find_cycles(graph())
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    backward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
                if a != "lorakit" and b != "lorakit" and layer(b) > layer(a)]
    assert backward == []


def test_training_uses_only_the_engine_of_serving_and_serving_never_training():
    """GRPO decodes its rollouts with serving's engine (one engine for every decode); the HTTP
    server, the adapter store and the slots stay serving's own."""
    crossing = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
                if a.startswith("lorakit.training") and b.startswith("lorakit.serve") and b != "lorakit.serve.engine"
                or a.startswith("lorakit.serve") and b.startswith("lorakit.training")]
    assert crossing == []


def test_the_checker_sees_a_cycle_and_a_backward_arrow(tmp_path):
    """The checks can fail: a planted function-level import is found, and makes a cycle."""
    modules = module_files()
    planted = tmp_path / "config.py"
    planted.write_text(modules["lorakit.config"].read_text() + "\n\ndef _late():\n    from .training import loop\n")
    found = imports("lorakit.config", planted, modules)
    assert "lorakit.training.loop" in found and layer("lorakit.training.loop") > layer("lorakit.config")
    edges = {**graph(), "lorakit.config": found}
    assert any(c[0] == "lorakit.config" or "lorakit.config" in c for c in find_cycles(edges))


# What only the kinds (variants/) and the layouts' homes (layouts.py, and the layer classes that
# declare them: layers.py, experts.py, bnb.py) may name: the rest of lorakit asks a value's kind
# and layout, so a new kind or layout lands in one file plus its registration.
KIND_NAMES = {"dora", "loha", "lokr", "pissa", "olora"}
KIND_CLASSES = {"DoraAdapter", "LohaAdapter", "LokrAdapter", "PrincipalAdapter", "ProductAdapter"}
LAYOUT_NAMES = {"linear", "conv1d", "embedding", "conv2d", "experts"}
LAYOUT_OBJECTS = {"LINEAR", "CONV1D", "EMBEDDING", "CONV2D", "EXPERTS", "Matrix", "Transposed", "EmbeddingTable",
                  "Kernel", "Stacked"}
HOMES = ("lorakit.variants", "lorakit.layouts", "lorakit.layers", "lorakit.experts", "lorakit.bnb")


def _names_of_kinds_and_layouts(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in KIND_NAMES:
            found.append(f"line {node.lineno}: the string {node.value!r}")
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in KIND_CLASSES | LAYOUT_OBJECTS:
                found.append(f"line {node.lineno}: {name}")
        elif isinstance(node, ast.alias) and node.name in KIND_CLASSES | LAYOUT_OBJECTS:
            found.append(f"an import of {node.name}")
        elif isinstance(node, ast.Compare):  # layout == "experts", layout in ("linear", "conv2d")
            sides = [node.left, *node.comparators]
            strings = {c.value for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant)}
            if strings & LAYOUT_NAMES and any(isinstance(s, ast.Attribute) and s.attr == "layout" for s in sides):
                found.append(f"line {node.lineno}: a layout compared with its name")
    return found


def test_only_the_kinds_and_layouts_name_themselves():
    offenders = {}
    for name, path in module_files().items():
        if name.startswith(HOMES):
            continue
        found = _names_of_kinds_and_layouts(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[name] = found
    assert offenders == {}


def test_the_name_check_finds_what_it_looks_for():
    code = 'x = layer.layout == "experts"\nfrom .variants import DoraAdapter\ny = {"loha": 1}\nz = CONV2D'
    assert len(_names_of_kinds_and_layouts(ast.parse(code))) == 4

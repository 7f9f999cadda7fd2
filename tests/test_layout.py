"""The library's house rules (issue 31), read from the source: rooms that import only downwards, no import
circle, no import hidden inside a function, no module over 450 lines, every reference to a section of
docs/design.md resolvable."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mtq_common"
ROOMS = ("training", "data", "envs", "agents", "evaluation")
"""From the bottom up: a room may import its own modules and those of the rooms before it."""
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(path: Path) -> list[tuple[str, bool]]:
    """`(module, at_top)` for every import of an mtq_common module in `path` (`from mtq_common.x import y`
    counts `mtq_common.x.y` when that is a module, else `mtq_common.x`)."""
    modules = _modules()
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtq_common"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                out.append((name if name in modules else node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("mtq_common")]
    return out


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ROOMS else None


def test_every_module_lives_in_a_room():
    loose = [m for m in _modules() if m.count(".") == 1 and m not in ("mtq_common.policy",) + tuple(
        f"mtq_common.{room}" for room in ROOMS)]  # fmt: skip
    assert not loose, f"modules outside the rooms {ROOMS}: {loose}"


def test_rooms_import_only_downwards():
    upward = []
    for module, path in _modules().items():
        room = _room(module)
        if room is None:
            continue
        for target, _ in _imports(path):
            other = _room(target)
            if other is not None and ROOMS.index(other) > ROOMS.index(room):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_circle_and_no_import_inside_a_function():
    graph = {module: {t for t, _ in _imports(path) if t != module} for module, path in _modules().items()}
    # The package root loads `mtq_common.policy` on first use (PEP 562) to keep `import mtq_common` light.
    inner = [f"{m} -> {t}" for m, p in _modules().items() for t, at_top in _imports(p) if not at_top]
    assert not inner, f"imports inside functions: {inner}"
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*path[path.index(nxt) :], nxt])}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_no_module_over_450_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_design_reference_names_a_section_of_docs_design():
    sections = {int(n) for n in re.findall(r"^## (\d+)\b", (REPO / "docs" / "design.md").read_text(), re.M)}
    assert sections
    files = [*REPO.glob("*.py"), *(p for folder in ("mtq_common", "kernels", "benchmarks", "tests")
                                   for p in (REPO / folder).rglob("*.py"))]  # fmt: skip
    unresolved = []
    for path in files:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for match in re.finditer(r"\bDESIGN\b(?: sections?)? ?([\d, and]*)", line):
                numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
                if not numbers or any(n not in sections for n in numbers):
                    unresolved.append(f"{path.relative_to(REPO)}:{line_no}: {line.strip()}")
    assert not unresolved, unresolved

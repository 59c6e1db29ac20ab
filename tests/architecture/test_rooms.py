"""The house rules of the code base, checked on its source (docs/architecture.md):

- rooms import downwards only: the model core (models/base.py, likelihood.py, layers.py, compiled.py) <- the
  cached samplers (models/sampling/) <- the models and their checkpoints (the rest of models/) <-
  scoring (models/scoring/) <- the offline tools (models/tools/) <- the service (service/): a sampler
  never imports a model module, nothing in models/ imports service/ (no web code), and the service
  imports the tools only to put their subcommands beside ``serve`` in the genserve command;
- no import cycle between modules, counting imports inside functions;
- every file under 400 lines and every function under 60, unless a comment on its ``def`` line
  says why (``# long: ...``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "service")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
CORE = {"models.base", "models.likelihood", "models.layers", "models.compiled", "models.threads"}
# Rooms from the bottom up; each may import its own and the rooms below it.
ORDER = ["core", "models.sampling", "models", "models.scoring", "models.tools", "service"]


def modules() -> dict[str, Path]:
    """Every module of the packages by dotted name."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def room(module: str) -> str:
    if module in CORE:
        return "core"
    parts = module.split(".")
    if parts[0] == "models" and len(parts) > 1 and parts[1] in ("sampling", "scoring", "tools"):
        return ".".join(parts[:2])
    return parts[0]


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def test_rooms_import_downwards_only() -> None:
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        for d in sorted(deps)
        if ORDER.index(room(d)) > ORDER.index(room(m))
    ]
    assert not wrong, wrong


def test_only_the_command_line_of_the_service_reaches_the_tools() -> None:
    """The app never depends on the offline tools; service/cli.py only adds their subcommands."""
    reaching = sorted(
        m for m, deps in graph().items() if room(m) == "service" and any(room(d) == "models.tools" for d in deps)
    )
    assert reaching == ["service.cli"], reaching


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules, or None (a package's __init__ importing its own
    submodules is not a cycle to the submodules: they import the package first)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if m.startswith(d + "."):  # a submodule importing its parent package
                continue
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_files_and_functions_are_short(package: str) -> None:
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        lines = path.read_text().splitlines()
        where = path.relative_to(ROOT)
        if len(lines) >= MAX_FILE_LINES:
            long.append(f"{where}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                header = lines[node.lineno - 1]
                if n >= MAX_FUNCTION_LINES and "# long:" not in header:
                    long.append(f"{where}:{node.lineno} {node.name}: {n} lines")
    assert not long, long


def test_the_server_runs_without_the_tools_extras() -> None:
    """matplotlib and tqdm are the tools' extras: the app and the genserve command import without them."""
    code = (
        "import sys\n"
        "for name in ('matplotlib', 'tqdm'):\n"
        "    sys.modules[name] = None  # any import of it raises ImportError\n"
        "import service.cli, service.app\n"
        "from service.settings import Settings\n"
        "app = service.app.create_app(Settings(model_dir='checkpoints'))\n"
        "assert '/score' in app.openapi()['paths']\n"
        "service.cli.build_parser().parse_args(['serve', '--port', '1'])\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)

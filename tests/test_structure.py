"""The package's import structure: no import circle, no upward import.

Pure `ast` over the source files (nothing is imported), so it is fast and
sees every import: at module top AND inside functions (an in-function import
hides a circle from Python at load time but it is still a circle).

Rules checked:
- no cycle in the graph of `teams_rl_jax` modules (an edge per `import
  teams_rl_jax.x` / `from teams_rl_jax.x import y` / relative import, wherever
  it is written);
- no upward import: a module inside a subpackage never imports a top-level
  CLI module (`teams_rl_jax.train`);
- imports of the project's own modules sit at module top; an in-function
  import of a `teams_rl_jax` module is allowed only where listed in
  IN_FUNCTION_ALLOWED (with its reason).
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PKG = "teams_rl_jax"
ROOT = Path(__file__).resolve().parent.parent / PKG

# Top-level modules that are CLIs / entry points: nothing inside a subpackage may import them. Besides
# these, any top-level module with an ``if __name__ == "__main__":`` block counts (see cli_modules).
CLI_MODULES = {f"{PKG}.train"}


# In-function imports of the project's own modules are allowed, without listing, in two places:
# a module-level ``__getattr__`` (PEP 562 lazy exports: importing a package stays cheap) and the CLI
# entry points (``__main__`` modules and CLI_MODULES: the fast ``--help`` path). Anywhere else they
# need an entry here: (importing module, imported module) -> reason. Keep this list short.
IN_FUNCTION_ALLOWED: dict[tuple[str, str], str] = {
    (f"{PKG}.sft", f"{PKG}.sft.loop"): "train/run_sft_stage: the loop pulls in Orbax and tensorboardX",
    (f"{PKG}.backends", f"{PKG}.backends.flax_backend"):
        "build/build_roles: importing the package (RoleConfig, base) must not import jax (serve.app stays jax-free)",
    (f"{PKG}.backends", f"{PKG}.backends.openai_backend"): (
        "build: as flax_backend (the package __getattr__ is lazy too): it would pull the data package and numpy into "
        "every `import teams_rl_jax.backends.config`"),
    (f"{PKG}.backends", f"{PKG}.backends.openai_batch"): "build: as openai_backend (it subclasses OpenAIBackend)",
}

# Modules whose in-function imports other helpers of issue 17 are moving to module top (or that no
# helper owns yet). Their check is expected to fail (xfail, not strict): when one passes, drop it here.
PENDING_MODULE_TOP: dict[str, str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _edges_of(node: ast.AST, mod: str, is_pkg: bool, known: set[str]):
    """Yield imported project module names for one import node."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == PKG:
                yield _longest_known(alias.name, known)
    elif isinstance(node, ast.ImportFrom):
        target = (
            _resolve_relative(mod, is_pkg, node.level, node.module)
            if node.level else node.module or ""
        )
        if target.split(".")[0] != PKG:
            return
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            # `from pkg import submodule` imports the submodule itself.
            yield sub if sub in known else _longest_known(target, known)


def _longest_known(name: str, known: set[str]) -> str:
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or name


def _in_type_checking(parents: list[ast.AST]) -> bool:
    for p in parents:
        if isinstance(p, ast.If):
            t = p.test
            name = t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "")
            if name == "TYPE_CHECKING":
                return True
    return False


@functools.lru_cache(maxsize=None)
def collect_imports(root: Path = ROOT):
    """Return {module: [(imported, lineno, where)]} for every module; ``where`` is ``"top"`` (module
    level, including ``if``/``try`` blocks), ``"lazy"`` (a module-level ``__getattr__``) or ``"function"``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph: dict[str, list[tuple[str, int, str]]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        out: list[tuple[str, int, str]] = []

        def visit(node, parents):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not _in_type_checking(parents):
                funcs = [p for p in parents if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
                lazy = len(funcs) == 1 and getattr(funcs[0], "name", "") == "__getattr__" and parents[1] is funcs[0]
                where = "top" if not funcs else ("lazy" if lazy else "function")
                for dep in sorted(set(_edges_of(node, mod, is_pkg, known))):
                    if dep != mod:
                        out.append((dep, node.lineno, where))
            for child in ast.iter_child_nodes(node):
                visit(child, parents + [node])

        visit(tree, [])
        graph[mod] = out
    return graph


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan).

    A module importing its own package's `__init__` (which imports the module
    back) is Python's normal package layout, not a circle: an edge from a
    module to one of its ancestor packages is left out.
    """
    adj = {
        m: sorted({d for d, _, _ in deps if d in graph and d not in _ancestors(m)})
        for m, deps in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            strong(v)
    return sorted(sccs)


def _describe(graph, comp: list[str]) -> str:
    lines = []
    members = set(comp)
    for m in comp:
        for d, line, where in graph[m]:
            if d in members and d not in _ancestors(m):
                lines.append(f"  {m}:{line} -> {d} ({'at module top' if where == 'top' else 'in a function'})")
    return " <-> ".join(comp) + "\n" + "\n".join(lines)


def test_no_import_cycle():
    graph = collect_imports()
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def _is_main_guard(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(t, ast.Compare) and isinstance(t.left, ast.Name)
            and t.left.id == "__name__")


def cli_modules(root: Path = ROOT) -> set[str]:
    """CLI_MODULES plus every top-level module of the package that runs as a script."""
    found = {module_name(p, root) for p in root.glob("*.py")
             if any(_is_main_guard(n) for n in ast.parse(p.read_text()).body)}
    return CLI_MODULES | found


def test_no_upward_import():
    graph = collect_imports()
    bad = [
        f"{m}:{line} imports {d}"
        for m, deps in graph.items()
        if m.count(".") >= 2  # inside a subpackage
        for d, line, _ in deps
        if d in CLI_MODULES
    ]
    assert not bad, "upward imports (a subpackage importing a CLI module):\n" + "\n".join(bad)


def _is_cli(mod: str) -> bool:
    return mod in CLI_MODULES or mod.endswith(".__main__")


def _misplaced_imports(graph, mod: str) -> list[str]:
    if _is_cli(mod):
        return []
    return [f"{mod}:{line} imports {d} inside a function" for d, line, where in graph[mod]
            if where == "function" and (mod, d) not in IN_FUNCTION_ALLOWED]


def test_own_imports_at_module_top():
    graph = collect_imports()
    bad = [msg for m in sorted(graph) if m not in PENDING_MODULE_TOP for msg in _misplaced_imports(graph, m)]
    assert not bad, (
        "imports of the project's own modules belong at module top "
        "(or in IN_FUNCTION_ALLOWED with a reason):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize("module", sorted(PENDING_MODULE_TOP))
def test_pending_own_imports_at_module_top(module):
    graph = collect_imports()
    if module not in graph:
        pytest.skip(f"{module} no longer exists")
    bad = _misplaced_imports(graph, module)
    if bad:
        pytest.xfail(f"pending ({PENDING_MODULE_TOP[module]}): " + "; ".join(bad))


# -- the checker itself, on a small synthetic package -------------------------

def class_homes(root: Path = ROOT) -> dict[str, list[str]]:
    """Top-level class name -> the modules that define it."""
    homes: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                homes.setdefault(node.name, []).append(module_name(path, root))
    return homes


def test_one_home_per_class_name(tmp_path):
    """No two classes of the package share a name (a newcomer finds a concept once). The checker itself
    is shown a two-home name first, so a checker that finds nothing cannot pass."""
    planted = _write(tmp_path, {"a.py": "class Twice:\n    pass\n", "b.py": "class Twice:\n    pass\n"})
    assert len(class_homes(planted)["Twice"]) == 2
    twice = {name: mods for name, mods in class_homes().items() if len(mods) > 1}
    assert not twice, f"class names defined in several modules: {twice}"


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / PKG
    for rel, text in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


def test_checker_sees_in_function_and_relative_cycles(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "from teams_rl_jax.a import x\n",
        "a/x.py": "from . import y\n",
        "a/y.py": "def f():\n    from teams_rl_jax.a.x import g\n",
        "b/__init__.py": "",
        "b/p.py": "import teams_rl_jax.b.q\n",
        "b/q.py": "from ..b import p\n",
        "c.py": "from teams_rl_jax.a import x\n",
    })
    graph = collect_imports(pkg)
    assert ("teams_rl_jax.a.x", 2, "function") in graph["teams_rl_jax.a.y"]
    assert find_cycles(graph) == [
        ["teams_rl_jax.a.x", "teams_rl_jax.a.y"],
        ["teams_rl_jax.b.p", "teams_rl_jax.b.q"],
    ]


def test_checker_ignores_type_checking_and_package_init(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "from .x import f\n",
        "a/x.py": "from teams_rl_jax.a import y\nfrom typing import TYPE_CHECKING\n"
                  "if TYPE_CHECKING:\n    from teams_rl_jax.a.z import T\n",
        "a/y.py": "",
        "a/z.py": "from teams_rl_jax.a import x\n",
    })
    assert find_cycles(collect_imports(pkg)) == []


def test_checker_tells_lazy_getattr_from_function_imports(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "def __getattr__(name):\n    from teams_rl_jax import b\n    return b\n",
        "b.py": "def f():\n    import teams_rl_jax.c\n",
        "c.py": "try:\n    from teams_rl_jax import b\nexcept ImportError:\n    pass\n",
    })
    graph = collect_imports(pkg)
    assert graph["teams_rl_jax"] == [("teams_rl_jax.b", 2, "lazy")]
    assert graph["teams_rl_jax.b"] == [("teams_rl_jax.c", 2, "function")]
    assert graph["teams_rl_jax.c"] == [("teams_rl_jax.b", 2, "top")]
    assert find_cycles(graph) == [["teams_rl_jax.b", "teams_rl_jax.c"]]

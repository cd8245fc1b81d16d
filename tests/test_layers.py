"""The import layers of the package, checked statically.

Every .py file of qwen2vl_jax/, convert/ and train/ is parsed with `ast`; every import in it
(at module level, inside functions and classes, under `if TYPE_CHECKING:`, relative or
absolute) is resolved to a project module, and the module graph is checked against the
table below. A failure lists every offending import as file:line.

Rules:
- upward: a core module imports only modules of its own layer or lower ones; nothing in the
  core imports the facade (`qwen2vl_jax/__init__.py`). `from qwen2vl_jax import X` counts as
  importing the submodule X when there is one, otherwise as importing the facade.
- unplaced: every core module is in LAYERS (a new module is placed in a layer on purpose).
  A package entry ("modules", "processing") covers the package and all its submodules.
- cycle: no strongly connected component of more than one module (deferred imports count).
- outside: the core never imports convert/ or train/; those two never import each other.
- host-jax: HOST_SIDE modules import no jax/flax/optax/orbax at all, and nothing they import
  at module level pulls one in; LAZY_JAX modules (processing) import them only inside
  functions, and nothing they import at module level pulls one in.
- forbidden: pairs of the same layer that must not import each other (DESIGN.md: the Flax
  modules never import processing).
- unresolved: an import of a project module that does not exist (it would raise ImportError).
- private: a module (of the package, convert/, train/ or benchmarks/) imports another project
  module's `_name`, reads `module._name` off an imported project module, or reads `x._name` (x
  not self/cls) where `_name` is defined in another project module and not in its own: a name
  with a leading underscore is private to the module that defines it.

"Deferred" imports (inside a function, or under `if TYPE_CHECKING:`) are edges of the graph
like any other, but they do not run when the importing module is imported, so they do not
count for the module-level jax rules. Dynamic imports (importlib.import_module, __import__)
are not seen. The checker is unit-tested on small fake trees at the end of this file.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import sys
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------- the table
PACKAGE = "qwen2vl_jax"  # the core package; its __init__.py is the facade (the top layer)

# Lowest layer first. A core module may import modules of its own layer or lower layers.
# Names are relative to PACKAGE; some do not exist yet (the refactor adds them).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "jsonio", "interrupts"),  # L0
    ("config",),  # L1
    # L2: distributed: jax + errors; quant: packed weights, a package whose format and quantize
    # modules import no jax (convert/ uses them; tests/test_quant.py checks it)
    # lora: adapters (the traced LoRA term, adapter leaves, PEFT's folder format)
    ("params", "sharding", "distributed", "hf_mapping", "safetensors_io", "quant", "lora"),
    ("modules", "processing"),  # L3: modules is Flax only; processing is numpy/PIL/tokenizers
    ("positions", "inputs", "grounding"),  # L4: host side, numpy only (grounding: plain Python)
    ("sampling", "decode_state", "engine", "checkpoint"),  # L5: decode_state: the KV cache and decode state the engine runs
    ("api", "xla_flags"),  # L6: xla_flags: what the CLIs set before JAX starts
    ("chat", "shell"),  # L7
    ("cli", "serving"),  # L8: serving: the HTTP server package (scheduler, schema, media, app, CLI)
]

# Outside the core: each may import any core module; the core never imports them; they never
# import each other. The folders as setuptools maps them (pyproject.toml's package-dir).
PACKAGE_DIRS = {PACKAGE: "qwen2vl_jax", f"{PACKAGE}.convert": "convert", f"{PACKAGE}.train": "train"}
OUTSIDE = (f"{PACKAGE}.convert", f"{PACKAGE}.train")

JAX_FAMILY = ("jax", "jaxlib", "flax", "optax", "orbax")
HOST_SIDE = ("positions", "inputs", "grounding")  # no jax-family import anywhere in them
LAZY_JAX = ("processing",)  # jax-family imports only inside functions
# Same-layer pairs (importer, imported) that are still forbidden.
FORBIDDEN = [("modules", "processing")]

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the checker
@dataclasses.dataclass(frozen=True)
class Import:
    src: str  # the importing module
    file: str  # its path, relative to the repository
    line: int
    target: str  # a project module, or an external dotted name, or "?name" when unresolved
    project: bool
    deferred: bool  # inside a function or under `if TYPE_CHECKING:`

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True, order=True)
class Offence:
    rule: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def discover(root: Path, package_dirs: dict[str, str] = PACKAGE_DIRS) -> dict[str, Path]:
    """module name -> file, for every .py file under the mapped folders."""
    modules = {}
    for prefix, folder in package_dirs.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """(node, deferred) for every Import/ImportFrom, wherever it is."""

    def walk(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), deferred)
            else:
                yield from walk(child, deferred)

    yield from walk(tree, False)


def _is_project(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    is_package = path.name == "__init__.py"
    file = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []

    def add(node, target, deferred, resolved=True):
        project = not resolved or _is_project(target)
        if project and (not resolved or target not in modules):
            target = "?" + target
        out.append(Import(module, file, node.lineno, target, project, deferred))

    for node, deferred in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, deferred)
            continue
        if node.level:  # relative: resolved against the importing module's package
            package = module if is_package else module.rpartition(".")[0]
            parts = package.split(".")
            if node.level - 1 >= len(parts):
                add(node, "." * node.level + (node.module or ""), deferred, resolved=False)
                continue
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            add(node, sub if _is_project(base) and sub in modules else base, deferred)
    return out


def group(module: str) -> str | None:
    """'core', 'facade', or the OUTSIDE package it belongs to; None: not a project module."""
    for outside in OUTSIDE:
        if module == outside or module.startswith(outside + "."):
            return outside
    if module == PACKAGE:
        return "facade"
    return "core" if _is_project(module) else None


def entry(module: str) -> str:
    """The LAYERS name a core module falls under: its first component below PACKAGE."""
    return module[len(PACKAGE) + 1:].split(".")[0]


def layer_index(layers=LAYERS) -> dict[str, int]:
    return {name: i for i, names in enumerate(layers) for name in names}


def layer_of(module: str, layers=LAYERS) -> int | None:
    if module == PACKAGE:
        return len(layers)  # the facade: above everything
    return layer_index(layers).get(entry(module))


def strongly_connected(nodes, edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        n = stack.pop()
                        on_stack.discard(n)
                        comp.append(n)
                        if n == node:
                            break
                    out.append(sorted(comp))
    return out


def _short(module: str) -> str:
    return module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else module


def _label(module: str, layers) -> str:
    if module == PACKAGE:
        return f"the facade {PACKAGE}"
    i = layer_of(module, layers)
    return f"{_short(module)} (L{i})" if i is not None else _short(module)


def _jax_family(target: str) -> bool:
    return target.split(".")[0] in JAX_FAMILY


def check(root: Path, layers=LAYERS, package_dirs=PACKAGE_DIRS) -> list[Offence]:
    modules = discover(root, package_dirs)
    imports = [i for m, p in modules.items() for i in imports_of(m, p, modules, root)]
    rel = {m: p.relative_to(root).as_posix() for m, p in modules.items()}
    idx = layer_index(layers)
    off: list[Offence] = []

    for m in modules:
        if group(m) == "core" and entry(m) not in idx:
            off.append(Offence("unplaced", rel[m], 1, f"{m} is in no layer of LAYERS (place it deliberately)"))

    for imp in imports:
        if not imp.project:
            continue
        if imp.target.startswith("?"):
            off.append(Offence("unresolved", imp.file, imp.line,
                               f"{_short(imp.src)} imports {imp.target[1:]}, which is no module of the project"))
            continue
        gs, gt = group(imp.src), group(imp.target)
        if gs in ("core", "facade") and gt in OUTSIDE:
            off.append(Offence("outside", imp.file, imp.line,
                               f"core module {_short(imp.src)} imports {_short(imp.target)}"))
        elif gs in OUTSIDE and gt in OUTSIDE and gs != gt:
            off.append(Offence("outside", imp.file, imp.line, f"{_short(imp.src)} imports {_short(imp.target)}"))
        if gs != "core" or gt not in ("core", "facade"):
            continue
        ls, lt = layer_of(imp.src, layers), layer_of(imp.target, layers)
        if ls is not None and lt is not None and lt > ls:
            off.append(Offence("upward", imp.file, imp.line,
                               f"{_label(imp.src, layers)} imports {_label(imp.target, layers)}"))
        if (entry(imp.src), entry(imp.target)) in FORBIDDEN and gt == "core":
            off.append(Offence("forbidden", imp.file, imp.line,
                               f"{_short(imp.src)} imports {_short(imp.target)} (forbidden within layer L{ls})"))

    # jax: direct imports, then what module-level project imports pull in.
    eager_jax = {}  # module -> its first module-level jax-family import
    for imp in imports:
        if not imp.project and not imp.deferred and _jax_family(imp.target):
            eager_jax.setdefault(imp.src, imp)
    for imp in imports:
        if imp.project or not _jax_family(imp.target) or group(imp.src) != "core":
            continue
        if entry(imp.src) in HOST_SIDE:
            off.append(Offence("host-jax", imp.file, imp.line,
                               f"host-side {_short(imp.src)} imports {imp.target}"))
        elif entry(imp.src) in LAZY_JAX and not imp.deferred:
            off.append(Offence("host-jax", imp.file, imp.line,
                               f"{_short(imp.src)} imports {imp.target} at module level (import it inside the function)"))
    eager = {}
    for imp in imports:
        if imp.project and not imp.deferred and not imp.target.startswith("?"):
            eager.setdefault(imp.src, []).append(imp)
    for imp in imports:
        if not (imp.project and not imp.deferred and group(imp.src) == "core"
                and entry(imp.src) in HOST_SIDE + LAZY_JAX and imp.target in modules):
            continue
        chain = _path_to_jax(imp.target, eager, eager_jax, own=lambda m: group(m) == "core"
                             and entry(m) in HOST_SIDE + LAZY_JAX)
        if chain is not None:
            names = " -> ".join(_short(m) for m in [imp.src, *chain])
            off.append(Offence("host-jax", imp.file, imp.line,
                               f"{_short(imp.src)} loads jax when imported: {names} "
                               f"({eager_jax[chain[-1]].where}: import {eager_jax[chain[-1]].target})"))

    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.project and imp.target in modules and imp.target != imp.src:
            edges.setdefault(imp.src, set()).add(imp.target)
    for comp in strongly_connected(sorted(modules), edges):
        if len(comp) < 2:
            continue
        members = set(comp)
        inside = sorted((i for i in imports if i.src in members and i.target in members and i.target != i.src),
                        key=lambda i: (i.file, i.line))
        first = inside[0]
        detail = "; ".join(dict.fromkeys(f"{i.where} -> {_short(i.target)}" for i in inside))
        off.append(Offence("cycle", first.file, first.line,
                           f"import cycle among {', '.join(_short(m) for m in comp)}: {detail}"))
    return sorted(set(off))


def _path_to_jax(start: str, eager: dict, eager_jax: dict, own) -> list[str] | None:
    """Breadth-first over module-level project imports: the shortest chain from start to a
    module that imports a jax-family package at module level. Modules for which own(m) holds
    are checked on their own, so the walk does not go through them (one report per cause)."""
    if own(start):
        return None
    seen, queue = {start}, [[start]]
    while queue:
        chain = queue.pop(0)
        if chain[-1] in eager_jax:
            return chain
        if len(chain) > 1 and own(chain[-1]):
            continue
        for imp in eager.get(chain[-1], ()):
            if imp.target not in seen:
                seen.add(imp.target)
                queue.append([*chain, imp.target])
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, assigned names and attributes
    (`self._x = ...`), arguments, and names it imports."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.alias):
            out.add((node.asname or node.name).split(".")[0])
    return out


def private_uses(root: Path, modules: dict[str, Path], extra_dirs=("benchmarks",)) -> list[Offence]:
    """The `private` rule over the project's modules and the scripts in extra_dirs."""
    files = dict(modules)
    for folder in extra_dirs:
        for path in sorted((root / folder).glob("*.py")) if (root / folder).is_dir() else ():
            files[f"{folder}.{path.stem}"] = path
    trees = {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in files.items()}
    defined = {m: _defined_names(t) for m, t in trees.items()}
    owners: dict[str, set[str]] = {}
    for m, names in defined.items():
        for name in names:
            if _is_private(name) and m in modules:
                owners.setdefault(name, set()).add(m)
    off = []
    for m, tree in trees.items():
        file = files[m].relative_to(root).as_posix()
        module_aliases = {}  # a local name bound to a project module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module and _is_project(node.module):
                for alias in node.names:
                    if _is_private(alias.name):
                        off.append(Offence("private", file, node.lineno,
                                           f"{_short(m)} imports {alias.name} from {_short(node.module)}"))
                    elif f"{node.module}.{alias.name}" in modules:
                        module_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_project(alias.name) and alias.asname:
                        module_aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in module_aliases:
                off.append(Offence("private", file, node.lineno,
                                   f"{_short(m)} uses {_short(module_aliases[base.id])}.{node.attr}"))
            elif isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            elif isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            elif node.attr not in defined[m] and owners.get(node.attr, set()) - {m}:
                where = ", ".join(sorted(_short(o) for o in owners[node.attr]))
                off.append(Offence("private", file, node.lineno,
                                   f"{_short(m)} uses .{node.attr}, private to {where}"))
    return off


@functools.lru_cache(maxsize=None)
def repo_offences() -> tuple[Offence, ...]:
    return tuple(sorted(set(check(REPO)) | set(private_uses(REPO, discover(REPO)))))


# ----------------------------------------------------------------------------- the repository
RULES = ["unplaced", "upward", "cycle", "outside", "host-jax", "forbidden", "unresolved", "private"]


@pytest.mark.parametrize("rule", RULES)
def test_repository_layers(rule):
    bad = [str(o) for o in repo_offences() if o.rule == rule]
    assert not bad, f"{len(bad)} layering offence(s) [{rule}]:\n" + "\n".join(bad)


def test_every_present_module_is_seen():
    """The walk really covers the tree (a wrong folder mapping would pass every rule)."""
    modules = discover(REPO)
    assert PACKAGE in modules and f"{PACKAGE}.processing" in modules and f"{PACKAGE}.modules" in modules
    assert any(group(m) == OUTSIDE[0] for m in modules) and any(group(m) == OUTSIDE[1] for m in modules)
    assert len(modules) == len(list((REPO / "qwen2vl_jax").rglob("*.py")) + list((REPO / "convert").rglob("*.py"))
                               + list((REPO / "train").rglob("*.py")))


def test_table_is_consistent_and_matches_pyproject():
    names = [n for layer in LAYERS for n in layer]
    assert len(names) == len(set(names)), "a name is in two layers"
    assert all(n in names for n in HOST_SIDE + LAZY_JAX + tuple(x for p in FORBIDDEN for x in p))
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == PACKAGE_DIRS


# ----------------------------------------------------------------------------- the checker itself
CLEAN = {
    "qwen2vl_jax/__init__.py": "from qwen2vl_jax.config import Config\nfrom qwen2vl_jax import cli\n",
    "qwen2vl_jax/errors.py": "class InputError(ValueError):\n    pass\n",
    "qwen2vl_jax/jsonio.py": "from qwen2vl_jax.errors import InputError\n",
    "qwen2vl_jax/config.py": "from .errors import InputError\n",
    "qwen2vl_jax/sharding.py": "import jax\nfrom qwen2vl_jax import config\n",
    "qwen2vl_jax/modules/__init__.py": "from .text import Text\n",
    "qwen2vl_jax/modules/text.py": "import flax.linen as nn\nfrom ..sharding import shard\nfrom . import rope\n",
    "qwen2vl_jax/modules/rope.py": "import jax.numpy as jnp\n",
    "qwen2vl_jax/processing/__init__.py": "from .image import load\n",
    "qwen2vl_jax/processing/image.py": (
        "import numpy as np\nfrom typing import TYPE_CHECKING\nfrom ..errors import InputError\n"
        "if TYPE_CHECKING:\n    import jax\n"
        "def to_jax(x):\n    import jax.numpy as jnp\n    return jnp.asarray(x)\n"
    ),
    "qwen2vl_jax/positions.py": "import numpy as np\nfrom qwen2vl_jax.processing import image\n",
    "qwen2vl_jax/cli.py": "def main():\n    from qwen2vl_jax.positions import x\n    from qwen2vl_jax.modules import text\n",
    "convert/__init__.py": "",
    "convert/convert.py": "from qwen2vl_jax import cli, config\nfrom qwen2vl_jax.convert import gptq\nimport qwen2vl_jax\n",
    "convert/gptq.py": "from .. import errors\nfrom . import util as u\n",
    "convert/util.py": "u = 1\n",
    "train/__init__.py": "",
    "train/loop.py": "import optax\nfrom qwen2vl_jax.modules.text import Text\nfrom .convert_like import y\n",
    "train/convert_like.py": "y = 1\n",
}


def fake_tree(tmp_path: Path, changes: dict[str, str] | None = None) -> Path:
    """CLEAN with files replaced or added (text '' deletes one), written under tmp_path."""
    files = {**CLEAN, **(changes or {})}
    for name, text in files.items():
        if text:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
    return tmp_path


def offences(root, rule=None) -> list[str]:
    return [str(o) for o in check(root) if rule is None or o.rule == rule]


def test_checker_passes_a_clean_tree(tmp_path):
    assert offences(fake_tree(tmp_path)) == []


def test_checker_resolves_imports(tmp_path):
    root = fake_tree(tmp_path)
    modules = discover(root)
    assert set(modules) >= {"qwen2vl_jax", "qwen2vl_jax.modules", "qwen2vl_jax.modules.text",
                            "qwen2vl_jax.convert.gptq", "qwen2vl_jax.train.loop"}
    got = {(i.line, i.target, i.deferred)
           for i in imports_of("qwen2vl_jax.modules.text", modules["qwen2vl_jax.modules.text"], modules, root)}
    assert got == {(1, "flax.linen", False), (2, "qwen2vl_jax.sharding", False), (3, "qwen2vl_jax.modules.rope", False)}
    got = {(i.line, i.target) for i in imports_of("qwen2vl_jax.convert.gptq", modules["qwen2vl_jax.convert.gptq"],
                                                   modules, root)}
    assert got == {(1, "qwen2vl_jax.errors"), (2, "qwen2vl_jax.convert.util")}
    got = {(i.line, i.target, i.deferred) for i in imports_of(
        "qwen2vl_jax.processing.image", modules["qwen2vl_jax.processing.image"], modules, root)}
    assert (5, "jax", True) in got and (7, "jax.numpy", True) in got
    got = {i.target for i in imports_of("qwen2vl_jax.convert.convert", modules["qwen2vl_jax.convert.convert"],
                                        modules, root)}
    assert got == {"qwen2vl_jax.cli", "qwen2vl_jax.config", "qwen2vl_jax.convert.gptq", "qwen2vl_jax"}


@pytest.mark.parametrize("case,rule,expected", [
    # an upward import inside a function, absolute
    ({"qwen2vl_jax/config.py": "def f():\n    from qwen2vl_jax.sharding import shard\n"},
     "upward", ["qwen2vl_jax/config.py:2: config (L1) imports sharding (L2)"]),
    # relative, two levels up
    ({"qwen2vl_jax/processing/image.py": "x = 1\nfrom ..cli import main\n"},
     "upward", ["qwen2vl_jax/processing/image.py:2: processing.image (L3) imports cli (L8)"]),
    # `from qwen2vl_jax import X`: the submodule X, or the facade when X is a name
    ({"qwen2vl_jax/errors.py": "from qwen2vl_jax import jsonio, positions\nfrom qwen2vl_jax import __version__\n"},
     "upward", ["qwen2vl_jax/errors.py:1: errors (L0) imports positions (L4)",
                "qwen2vl_jax/errors.py:2: errors (L0) imports the facade qwen2vl_jax"]),
    ({"qwen2vl_jax/config.py": "import qwen2vl_jax\n"},
     "upward", ["qwen2vl_jax/config.py:1: config (L1) imports the facade qwen2vl_jax"]),
    # a cycle within one layer
    ({"qwen2vl_jax/errors.py": "class E(Exception):\n    def f(self):\n        import qwen2vl_jax.jsonio\n"},
     "cycle", ["qwen2vl_jax/errors.py:3: import cycle among errors, jsonio: "
               "qwen2vl_jax/errors.py:3 -> jsonio; qwen2vl_jax/jsonio.py:1 -> errors"]),
    # a package importing its own __init__ from a submodule
    ({"qwen2vl_jax/modules/rope.py": "from qwen2vl_jax.modules import Text\n"},
     "cycle", ["qwen2vl_jax/modules/__init__.py:1: import cycle among modules, modules.rope, modules.text: "
               "qwen2vl_jax/modules/__init__.py:1 -> modules.text; qwen2vl_jax/modules/rope.py:1 -> modules; "
               "qwen2vl_jax/modules/text.py:3 -> modules.rope"]),
    # a cycle outside the core
    ({"convert/util.py": "def f():\n    from .gptq import g\n"},
     "cycle", ["convert/gptq.py:2: import cycle among convert.gptq, convert.util: "
               "convert/gptq.py:2 -> convert.util; convert/util.py:2 -> convert.gptq"]),
    # the core importing train/convert, and convert <-> train
    ({"qwen2vl_jax/cli.py": "def main():\n    from qwen2vl_jax.train import loop\n    from qwen2vl_jax.convert.gptq import g\n"},
     "outside", ["qwen2vl_jax/cli.py:2: core module cli imports train.loop",
                 "qwen2vl_jax/cli.py:3: core module cli imports convert.gptq"]),
    ({"qwen2vl_jax/__init__.py": "from qwen2vl_jax.train import loop\n"},
     "outside", ["qwen2vl_jax/__init__.py:1: core module qwen2vl_jax imports train.loop"]),
    ({"train/loop.py": "def f():\n    from qwen2vl_jax.convert import convert\n",
      "convert/gptq.py": "from ..train.loop import f\n"},
     "outside", ["convert/gptq.py:1: convert.gptq imports train.loop",
                 "train/loop.py:2: train.loop imports convert.convert"]),
    # jax in host-side modules: anywhere; in processing: at module level, or pulled in
    ({"qwen2vl_jax/positions.py": "import numpy\ndef f():\n    import jax.numpy as jnp\n    from flax import linen\n"},
     "host-jax", ["qwen2vl_jax/positions.py:3: host-side positions imports jax.numpy",
                  "qwen2vl_jax/positions.py:4: host-side positions imports flax"]),
    ({"qwen2vl_jax/processing/image.py": "try:\n    import jax\nexcept ImportError:\n    jax = None\n"},
     "host-jax", ["qwen2vl_jax/processing/image.py:2: processing.image imports jax at module level "
                  "(import it inside the function)"]),
    ({"qwen2vl_jax/processing/image.py": "from qwen2vl_jax.config import C\n",
      "qwen2vl_jax/config.py": "from qwen2vl_jax import errors\n",
      "qwen2vl_jax/errors.py": "import optax\n"},
     "host-jax", ["qwen2vl_jax/processing/image.py:1: processing.image loads jax when imported: "
                  "processing.image -> config -> errors (qwen2vl_jax/errors.py:1: import optax)"]),
    ({"qwen2vl_jax/positions.py": "from qwen2vl_jax.processing import image\nfrom qwen2vl_jax.modules.text import T\n"},
     "host-jax", ["qwen2vl_jax/positions.py:2: positions loads jax when imported: positions -> modules.text "
                  "(qwen2vl_jax/modules/text.py:1: import flax.linen)"]),
    # a same-layer import that DESIGN.md forbids
    ({"qwen2vl_jax/modules/rope.py": "def f():\n    from qwen2vl_jax.processing.image import load\n"},
     "forbidden", ["qwen2vl_jax/modules/rope.py:2: modules.rope imports processing.image (forbidden within layer L3)"]),
    # a core module not in the table, and an import of a module that is not there
    ({"qwen2vl_jax/model.py": "from qwen2vl_jax.modules import text\n"},
     "unplaced", ["qwen2vl_jax/model.py:1: qwen2vl_jax.model is in no layer of LAYERS (place it deliberately)"]),
    ({"qwen2vl_jax/sub/deep.py": "x = 1\n"},
     "unplaced", ["qwen2vl_jax/sub/deep.py:1: qwen2vl_jax.sub.deep is in no layer of LAYERS (place it deliberately)"]),
    ({"qwen2vl_jax/cli.py": "from qwen2vl_jax.engine import Engine\nimport qwen2vl_jax.api\nfrom .. import x\n"},
     "unresolved", ["qwen2vl_jax/cli.py:1: cli imports qwen2vl_jax.engine, which is no module of the project",
                    "qwen2vl_jax/cli.py:2: cli imports qwen2vl_jax.api, which is no module of the project",
                    "qwen2vl_jax/cli.py:3: cli imports .., which is no module of the project"]),
])
def test_checker_catches(tmp_path, case, rule, expected):
    root = fake_tree(tmp_path, case)
    assert offences(root, rule) == expected


@pytest.mark.parametrize("case,expected", [
    ({"qwen2vl_jax/cli.py": "from qwen2vl_jax.config import _helper\n"},
     ["qwen2vl_jax/cli.py:1: cli imports _helper from config"]),
    ({"qwen2vl_jax/config.py": "def _helper():\n    pass\n",
      "qwen2vl_jax/cli.py": "from qwen2vl_jax import config\ndef main():\n    config._helper()\n"},
     ["qwen2vl_jax/cli.py:3: cli uses config._helper"]),
    ({"qwen2vl_jax/config.py": "class C:\n    def _expand(self):\n        return self._expand\n",
      "qwen2vl_jax/cli.py": "def main(c):\n    return c._expand()\n"},
     ["qwen2vl_jax/cli.py:2: cli uses ._expand, private to config"]),
    # its own private names, self/super, and private names of other libraries are fine
    ({"qwen2vl_jax/config.py": "class C:\n    def _f(self, o):\n        return o._f() + self._g + super()._h\n",
      "qwen2vl_jax/cli.py": "import os\ndef main():\n    return os._exit\n"}, []),
])
def test_checker_catches_private_names(tmp_path, case, expected):
    root = fake_tree(tmp_path, case)
    assert [str(o) for o in private_uses(root, discover(root))] == expected


# ----------------------------------------------------------------------------- benchmarks/
# The scripts in benchmarks/ run as `python benchmarks/X.py` against the installed package
# (`pip install -e .`): none patches sys.path (nor a child's PYTHONPATH), and none imports
# another script; what they share lives in the one module benchmarks/common.py. Imports are
# found anywhere in a file (inside functions too) and in string constants that parse as Python
# with imports in them (code run by `python -c` in a child process).
BENCH_SHARED = "common"
_PATH_METHODS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"}


def _is_sys_path(node: ast.AST, sys_names: set[str]) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id in sys_names)


def _bench_imports(tree: ast.AST, line0: int = 0):
    """(line, imported top-level name) of every import in tree, string-held code included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield line0 + node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x` / `from .x import y`: x is a sibling
                for name in [node.module] if node.module else [a.name for a in node.names]:
                    yield line0 + node.lineno, name.split(".")[0]
            elif node.module:
                yield line0 + node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:
                inner = ast.parse(node.value)
            except SyntaxError:
                continue
            yield from _bench_imports(inner, line0 + node.lineno - 1)


def benchmark_offences(root: Path) -> list[str]:
    """file:line: what, for every sys.path / PYTHONPATH patch and every import of another
    script in root/benchmarks/*.py."""
    folder = root / "benchmarks"
    scripts = {p.stem for p in folder.glob("*.py")} - {BENCH_SHARED}
    out = []
    for path in sorted(folder.glob("*.py")):
        file = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        sys_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names if a.name == "sys"}
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
                found.add((node.lineno, "imports sys.path by name (from sys import path)"))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in _PATH_METHODS and _is_sys_path(node.func.value, sys_names)):
                found.add((node.lineno, f"patches sys.path (sys.path.{node.func.attr})"))
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                for t in targets:
                    if _is_sys_path(t, sys_names) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value, sys_names)):
                        found.add((node.lineno, "patches sys.path (assignment)"))
            elif isinstance(node, ast.keyword) and node.arg == "PYTHONPATH":
                found.add((node.value.lineno, "patches a child's PYTHONPATH"))
            elif isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
                found.add((node.lineno, "patches a child's PYTHONPATH"))
        for line, name in _bench_imports(tree):
            if name in scripts:
                found.add((line, f"imports the script {name} (shared code belongs in benchmarks/{BENCH_SHARED}.py)"))
        out += [f"{file}:{line}: {what}" for line, what in sorted(found)]
    return out


def test_benchmarks_patch_no_path_and_import_no_script():
    assert (REPO / "benchmarks" / f"{BENCH_SHARED}.py").is_file()
    bad = benchmark_offences(REPO)
    assert not bad, f"{len(bad)} offence(s) in benchmarks/:\n" + "\n".join(bad)


def test_benchmark_checker_catches(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "common.py").write_text("import sys\n\ndef helper():\n    return sys.path[0]\n")
    (bench / "gen.py").write_text("import numpy as np\nfrom common import helper\n")
    (bench / "bad.py").write_text(
        "import os\nimport sys as system\nfrom pathlib import Path\n"
        "system.path.insert(0, str(Path(__file__).parent))\n"          # 4
        "system.path.append('x')\n"                                     # 5
        "system.path += ['y']\n"                                        # 6
        "system.path[0] = 'z'\n"                                        # 7
        "from gen import helper\n"                                      # 8
        "def main():\n"
        "    import gen.sub\n"                                          # 10
        "    env = dict(os.environ, PYTHONPATH='.')\n"                  # 11
        "    code = 'import sys; from gen import x; x()'\n"             # 12
        "    return code, env\n"
        "from sys import path\n")                                       # 14
    assert benchmark_offences(tmp_path) == [
        "benchmarks/bad.py:4: patches sys.path (sys.path.insert)",
        "benchmarks/bad.py:5: patches sys.path (sys.path.append)",
        "benchmarks/bad.py:6: patches sys.path (assignment)",
        "benchmarks/bad.py:7: patches sys.path (assignment)",
        "benchmarks/bad.py:8: imports the script gen (shared code belongs in benchmarks/common.py)",
        "benchmarks/bad.py:10: imports the script gen (shared code belongs in benchmarks/common.py)",
        "benchmarks/bad.py:11: patches a child's PYTHONPATH",
        "benchmarks/bad.py:12: imports the script gen (shared code belongs in benchmarks/common.py)",
        "benchmarks/bad.py:14: imports sys.path by name (from sys import path)",
    ]

"""The package's imports run one way (ARCHITECTURE.md, "Layering"): no module imports another that imports it back,
whether at module level or inside a function, where a cycle hides until the function runs.

The graph is read from the source with `ast`, so an import inside any function counts. `from . import x` is an
edge to module x when nanogpt2/x.py exists, else to the package itself (nanogpt2/__init__.py).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"nanogpt2": os.path.join(ROOT, "nanogpt2"), "nanogpt2.kernels": os.path.join(ROOT, "kernels")}


def modules() -> dict[str, str]:
    """dotted name -> file, for every module of nanogpt2 and nanogpt2.kernels (the kernels/ folder)."""
    found = {}
    for package, folder in PACKAGES.items():
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                found[package if name == "__init__.py" else f"{package}.{name[:-3]}"] = os.path.join(folder, name)
    return found


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:   # `from pkg import name` may name a submodule
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, path, set(mods)) for m, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]):
    """One cycle as a list of modules (first == last), or None: depth-first search with three colours."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = graph()
    edges["nanogpt2.config"] = edges["nanogpt2.config"] | {"nanogpt2.model"}   # model -> config already
    cycle = find_cycle(edges)
    assert cycle and cycle[0] == cycle[-1] and {"nanogpt2.config", "nanogpt2.model"} <= set(cycle)


def test_imports_inside_functions_are_seen(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from .model import GPT2Model\n    from . import generation\n")
    known = {"nanogpt2.model", "nanogpt2.generation", "nanogpt2.mod"}
    assert imports_of("nanogpt2.mod", str(src), known) == {"nanogpt2.model", "nanogpt2.generation"}


@pytest.mark.parametrize("lower,upper", [
    ("nanogpt2.config", "nanogpt2.weights"),      # config is data; the file lookup lives in files.py
    ("nanogpt2.weights", "nanogpt2.model"),       # the I/O layer receives the model class
    ("nanogpt2.weights", "nanogpt2.lora"),        # saving refuses adapters through a flag the module sets
    ("nanogpt2.generation", "nanogpt2.model"),    # generation works on any model through its methods
    ("nanogpt2.compiled", "nanogpt2.model"),
])
def test_lower_layers_do_not_know_upper_ones(lower, upper):
    assert upper not in graph()[lower]


def test_kernels_know_nothing_of_gpt2():
    edges = graph()
    for m, targets in edges.items():
        if m.startswith("nanogpt2.kernels"):
            assert all(t.startswith("nanogpt2.kernels") for t in targets), (m, targets)


def test_nothing_edits_sys_path():
    """A library that rewrites sys.path changes what the user's own scripts can import."""
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id in ("sys", "_sys"):
                pytest.fail(f"{module} touches sys.path (line {node.lineno})")


def test_a_checkout_root_on_sys_path_is_harmless():
    """Run from the checkout's root (its kernels/ folder on sys.path, as `python -m nanogpt2` or a user's own script
    puts it there): transformers must not take kernels/ for PyPI's `kernels` package (it decides by installed
    metadata, and 5.24 imports a package that has none: kernels/__init__.py then defines nothing, so no kernel
    module is imported twice and no custom op registered twice), nanogpt2's kernels must import as
    nanogpt2.kernels, and the root must stay on sys.path, where the user's own modules are."""
    import subprocess
    import sys
    code = (
        "import os, sys\n"
        "from transformers.utils import is_kernels_available\n"
        "import transformers, nanogpt2\n"
        "from nanogpt2 import kernels\n"
        "assert os.path.abspath(kernels.__file__).startswith(os.path.join(os.getcwd(), 'kernels')), kernels.__file__\n"
        "transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))\n"
        "copies = sorted(m for m in sys.modules if m.startswith('kernels.'))\n"   # after transformers' probe
        "assert not copies, f'kernel modules imported twice (their custom ops registered twice): {copies}'\n"
        "try:\n"
        "    import kernels.flash_attention\n"
        "    raise AssertionError('kernels.flash_attention imported outside nanogpt2.kernels')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "print(is_kernels_available(), os.getcwd() in [os.path.abspath(p or '.') for p in sys.path])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]

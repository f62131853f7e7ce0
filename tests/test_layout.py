"""The layout README.md describes, checked on the source: imports run one way between subpackages, no
module imports itself back through others, pure math stays pure, and each heavy library stays in
its own room."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)

GRAPH = import_graph.module_graph()
ALL_IMPORTS = {name: import_graph.imports_of(path, name) for name, path in import_graph.project_modules().items()}


def _importers(prefixes: tuple[str, ...]) -> set[str]:
    """Project modules importing any module whose name starts with one of `prefixes`."""
    return {module for module, names in ALL_IMPORTS.items()
            if any(n == p or n.startswith(p + ".") for n in names for p in prefixes)}


def test_every_module_is_in_a_layer():
    assert {import_graph.unit_of(m) for m in GRAPH} - set(import_graph.RANK) <= {"offline_search"}


def test_subpackages_import_only_from_lower_layers():
    upward = [(a, b) for a, b in import_graph.unit_edges(GRAPH)
              if import_graph.RANK[a] <= import_graph.RANK[b]]
    assert upward == []


def test_no_import_cycle_between_modules():
    assert import_graph.cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pure_math_imports_no_model_file_optuna_or_argparse():
    pure = {m for m in GRAPH if m.startswith("offline_search.core")} | {"vllm_adaspkv.kv.quant", "vllm_adaspkv.kv.paged",
                                                                          "vllm_adaspkv.sparse.packing"}
    forbidden = ("torch.nn", "optuna", "argparse", "pathlib", "os", "io", "safetensors", "transformers", "vllm",
                 "offline_search.data", "offline_search.model", "offline_search.search")

    def is_forbidden(name: str) -> bool:
        if name == "torch.nn.functional" or name.startswith("torch.nn.functional."):
            return False  # functions of tensors, not modules
        return any(name == f or name.startswith(f + ".") for f in forbidden)

    assert {"offline_search.core.metrics", "offline_search.core.masks", "offline_search.core.sparsegpt"} <= pure
    assert {m: sorted(filter(is_forbidden, ALL_IMPORTS[m])) for m in pure if any(map(is_forbidden, ALL_IMPORTS[m]))} == {}


def test_each_library_stays_in_its_room():
    assert _importers(("vllm",)) <= {m for m in GRAPH if m.startswith("vllm_adaspkv.engine")} | {"vllm_adaspkv"}
    assert _importers(("optuna",)) <= {"offline_search.search.study", "offline_search.search.workers",
                                        "offline_search.search.report"}
    assert _importers(("gradio",)) <= {m for m in GRAPH if m.startswith("demo")}
    assert _importers(("datasets",)) <= {"offline_search.data.calibration_data"}
    # argparse: the command line, and vLLM's own parser that the plugin's --plugin option extends
    assert _importers(("argparse",)) <= ({m for m in GRAPH if m.startswith("offline_search.cli")}
                                         | {"demo.cli", "vllm_adaspkv.engine.plugin_flag"})


def test_serving_does_not_import_the_search_or_the_demo():
    """What `vllm serve --plugin adaspkv` imports, in a fresh process: no Optuna, Gradio, datasets."""
    code = ("import sys, vllm_adaspkv, vllm_adaspkv.engine.model, vllm_adaspkv.engine.plugin_flag; "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('optuna', 'gradio', 'datasets', 'offline_search', 'demo', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_serving_dependencies_leave_the_search_and_the_demo_to_extras():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in project["dependencies"]}
    assert base.isdisjoint({"optuna", "gradio", "datasets", "matplotlib"})
    extras = project["optional-dependencies"]
    assert any(d.startswith("optuna") for d in extras["search"])
    assert any(d.startswith("gradio") for d in extras["demo"])


@pytest.mark.parametrize("package", ["vllm_adaspkv", "offline_search", "demo"])
def test_every_subpackage_says_what_it_is_for(package):
    for init in (REPO / package).rglob("__init__.py"):
        doc = ast_docstring(init)
        assert doc and len(doc.split()) >= 8, f"{init} has no docstring that says what the package is for"


def ast_docstring(path) -> str | None:
    import ast

    return ast.get_docstring(ast.parse(path.read_text()))


def test_the_cpp_sources_compiled_at_first_use_are_package_data():
    """The C++ kernels are compiled on the user's machine from the installed package: a source or
    header missing from pyproject's package-data is missing from a wheel install."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vllm_adaspkv"]
    package = REPO / "vllm_adaspkv"
    sources = [p.relative_to(package).as_posix() for ext in ("*.cpp", "*.h") for p in package.rglob(ext)]
    assert len(sources) >= 3  # the KV kernels, their row header, the packed linear
    assert [s for s in sources if not any(fnmatch.fnmatch(s, g) for g in globs)] == []

"""The contract's registries: declared count formulas against the built modules, the import graph, a drop-in tuner.

Counts: every preset on timm's ViT-S/B/L built on the meta device, every tuner type (default config) on the tiny ViT,
each compared with the tuners' declared ``parameter_count``.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import pkgutil
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_images, make_vit
from contract_cases import (
    META_VITS,
    PRESET_CASES,
    logits,
    perturb_,
    spec_of,
    trainable,
)
from torch import nn

import restune
import restune.tuners
from restune import contract
from restune.sites import find_sites, match_sites
from restune.spec import TuneSpec
from restune.tune import match_backbone

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------------------------
# Counts: the built modules against each tuner's declared formula, on ViT-S/B/L (meta device).
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _meta_prototype(name: str) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=100)


def meta_vit(name: str) -> nn.Module:
    """A fresh timm ViT on the meta device (a copy of one cached build: copying is cheaper than building)."""
    return copy.deepcopy(_meta_prototype(name))


def declared_count(model: nn.Module, spec: TuneSpec) -> int:
    """Sum of each config's ``parameter_count`` on the sites it matches, plus the backbone tensors it trains."""
    sites = find_sites(model)
    total = 0
    for config in spec.tuners:
        module_cls = contract.get_tuner(config.type).module_cls
        matched = match_sites(sites, config.sites, config.layers, module_cls.site_kinds)
        count = module_cls.parameter_count(config, matched)
        assert count is not None, f"{module_cls.__name__} declares no parameter_count"
        total += count
    params = dict(model.named_parameters())
    return total + sum(params[name].numel() for name in match_backbone(model, spec.train))


@pytest.mark.parametrize("vit", META_VITS)
@pytest.mark.parametrize("case", PRESET_CASES)
def test_preset_count_equals_the_declared_formula(case: str, vit: str) -> None:
    model, spec = meta_vit(vit), spec_of(case)
    expected = declared_count(model, spec)
    assert restune.report(restune.tune(model, spec)).trainable_without_head == expected


@pytest.mark.parametrize("name", contract.tuner_names())
def test_every_tuner_type_declares_its_count_formula(name: str) -> None:
    """Every type declares ``parameter_count``, and with its defaults it counts what the tiny ViT gets built."""
    entry = contract.get_tuner(name)
    config = entry.config_cls()
    model = make_vit(0)
    sites = match_sites(find_sites(model), config.sites, config.layers, entry.module_cls.site_kinds)
    declared = entry.module_cls.parameter_count(config, sites)
    assert declared is not None, (
        f"tuner {name!r}: {entry.module_cls.__name__} declares no count formula; implement the classmethod "
        "parameter_count(config, sites) (restune.contract.Tuner) with the method's formula, so the contract tests can "
        "check the built modules against it"
    )
    assert restune.report(restune.tune(model, config)).trainable_without_head == declared


# ---------------------------------------------------------------------------------------------------------------
# The import graph of src/restune has no cycle.
# ---------------------------------------------------------------------------------------------------------------

SRC = Path(restune.__file__).parent


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/restune."""
    files = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


class _Imports(ast.NodeVisitor):
    """Every import of one module, at module level and inside functions (``if TYPE_CHECKING:`` blocks never run)."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.targets: set[str] = set()

    def _add(self, name: str) -> None:
        while name and name not in self.modules:  # an attribute import reaches the module that defines it
            name = name.rpartition(".")[0]
        if name:
            self.targets.add(name)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.package
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.modules else base)


def import_graph() -> dict[str, set[str]]:
    """Module -> the restune modules it imports; a package that imports its modules with pkgutil imports them all."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        visitor = _Imports(name, path.name == "__init__.py", set(files))
        visitor.visit(tree)
        discovers = any(isinstance(node, ast.Attribute) and node.attr == "iter_modules" for node in ast.walk(tree))
        if path.name == "__init__.py" and discovers:
            visitor.targets |= set(submodules(name, files))
        graph[name] = visitor.targets - {name}
    return graph


def submodules(package: str, modules: dict[str, Path]) -> list[str]:
    """The public modules directly inside a package (what ``pkgutil.iter_modules`` discovery imports)."""
    return [m for m in modules if m.rpartition(".")[0] == package and not m.rpartition(".")[2].startswith("_")]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One import cycle through the component's first module: a shortest path back to it."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "restune.sites" in graph["restune.contract"] and "restune.tuners.lora" in graph["restune.tuners"]
    cycles = [" -> ".join(a_cycle(graph, c)) for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles in src/restune:\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    components = [c for c in strongly_connected(graph) if len(c) > 1]
    assert components == [["a", "b", "c"]]
    assert a_cycle(graph, components[0]) == ["a", "b", "c", "a"]


# ---------------------------------------------------------------------------------------------------------------
# A tuner written against the contract drops in without editing anything.
# ---------------------------------------------------------------------------------------------------------------

DROP_IN = "contract_drop_in"
DROP_IN_SOURCE = textwrap.dedent(
    '''
    """A tuner written against restune.contract alone: a parallel low-rank branch on every MLP."""

    from __future__ import annotations

    from dataclasses import dataclass

    import torch
    from torch import nn

    from restune.contract import Binding, Tuner, TunerConfig, default_sites, register_preset, register_tuner
    from restune.sites import MLP, Site
    from restune.spec import TuneSpec


    @dataclass
    class DropInConfig(TunerConfig):
        sites: str | list[str] = default_sites(r"blocks\\.\\d+\\.mlp")
        rank: int = 2


    class DropIn(Tuner):
        binding = Binding.PARALLEL
        site_kinds = frozenset({MLP})

        def __init__(self, config: DropInConfig, site: Site) -> None:
            super().__init__(config, site)
            factory = {"device": site.device, "dtype": site.dtype}
            self.down = nn.Parameter(torch.randn(site.in_features, config.rank, **factory) * 0.1)
            self.up = nn.Parameter(torch.zeros(config.rank, site.out_features, **factory))

        @classmethod
        def parameter_count(cls, config: DropInConfig, sites: list[Site]) -> int:
            return sum(config.rank * (s.in_features + s.out_features) for s in sites)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.down @ self.up


    register_tuner("NAME", DropInConfig, DropIn)
    register_preset("NAME", lambda: TuneSpec([DropInConfig()]))
    '''
).replace("NAME", DROP_IN)


@contextmanager
def dropped_in(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Import the drop-in tuner file from a temporary package; unregister it (and forget the module) afterwards."""
    package = directory / "contract_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "drop_in_tuner.py").write_text(DROP_IN_SOURCE)
    monkeypatch.syspath_prepend(str(directory))
    try:
        importlib.import_module("contract_plugins.drop_in_tuner")
        yield
    finally:
        for name in ("contract_plugins.drop_in_tuner", "contract_plugins"):
            sys.modules.pop(name, None)
        if DROP_IN in contract.tuner_names():
            contract.unregister_tuner(DROP_IN)
        if DROP_IN in contract.presets():
            contract.unregister_preset(DROP_IN)


def test_a_tuner_file_written_against_the_contract_drops_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_images()
    untuned = logits(make_vit(0), images)
    with dropped_in(tmp_path, monkeypatch):
        assert DROP_IN in contract.tuner_names() and DROP_IN in restune.presets()
        assert DROP_IN not in restune.presets(kind="bypass")
        model = make_vit(0)
        assert restune.tune(model, DROP_IN) is model
        assert torch.equal(logits(model, images), untuned)  # up = 0
        report = restune.report(model)
        assert report.trainable_without_head == 2 * 2 * (32 + 32)  # 2 blocks, rank 2, D = 32 in and out
        assert report.tuners == [("default", DROP_IN, 2, 256)]
        perturb_(trainable(model), seed=61)
        expected = logits(model, images)
        restune.save(model, tmp_path / "ckpt")  # the checkpoint names the type; load finds it in the registry
        assert torch.equal(logits(restune.load(make_vit(0), tmp_path / "ckpt"), images), expected)
    assert DROP_IN not in contract.tuner_names() and DROP_IN not in restune.presets()
    assert "contract_plugins.drop_in_tuner" not in sys.modules


def test_the_tuners_package_discovers_its_modules_instead_of_listing_them() -> None:
    """A tuner file dropped into restune/tuners/ needs no list edit: __init__ names no module, it discovers them."""
    tree = ast.parse(Path(restune.tuners.__file__).read_text())
    modules = {info.name for info in pkgutil.iter_modules(restune.tuners.__path__)}
    assert {"lora", "adapter", "vpt"} <= modules
    docstrings = {id(node.body[0].value) for node in ast.walk(tree) if _has_docstring(node)}
    named: set[str] = set()  # what an import statement or a string (a list of names, import_module) could name
    for node in ast.walk(tree):
        if isinstance(node, ast.alias):
            named.update(node.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            named.update(node.module.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            named.update(node.value.replace("/", ".").split("."))
    assert not modules & named, f"restune/tuners/__init__.py names tuner modules {sorted(modules & named)}"
    assert any(isinstance(node, ast.Attribute) and node.attr == "iter_modules" for node in ast.walk(tree))
    assert all(f"restune.tuners.{name}" in sys.modules for name in modules if not name.startswith("_"))


def _has_docstring(node: ast.AST) -> bool:
    body = getattr(node, "body", None)
    return (
        isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and bool(body)
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )

"""A missing optional dependency fails with the extra that installs it, at the places that import one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from restune.optional import require


def block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import module`` fail as if it were not installed (None in sys.modules halts the import)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


EXTRAS = [
    ("matplotlib.figure", "plot", "matplotlib"),
    ("sklearn.datasets", "suite", "scikit-learn"),
    ("peft", "peft", "peft"),
]


@pytest.mark.parametrize(("module", "extra", "package"), EXTRAS)
def test_a_missing_module_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str, package: str
) -> None:
    block(monkeypatch, module)
    with pytest.raises(ImportError) as info:
        require(module, extra, "restune something")
    assert str(info.value) == f"restune something needs {package}: pip install 'restune[{extra}]'"
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_present_module_is_returned() -> None:
    assert require("json", "none", "a test") is sys.modules["json"]


def test_a_broken_dependency_of_an_installed_module_is_not_blamed_on_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "restune_fake_optional.py").write_text("import restune_fake_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("restune_fake_optional", "plot", "a test")
    assert info.value.name == "restune_fake_missing_dependency"
    assert "restune[" not in str(info.value)


def test_plots_need_the_plot_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from restune.harness.plots import plot_curves

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0, "eval_acc": null}\n')
    block(monkeypatch, "matplotlib", "matplotlib.figure")
    with pytest.raises(ImportError, match=r"restune plot needs matplotlib: pip install 'restune\[plot\]'"):
        plot_curves([run], tmp_path / "curves.png")
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*"))


def test_the_demo_checks_for_its_chart_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from restune.demo import main_demo

    block(monkeypatch, "matplotlib", "matplotlib.figure")
    with pytest.raises(ImportError, match=r"restune\[plot\]"):
        main_demo(tmp_path / "demo", epochs=1)
    assert not (tmp_path / "demo").exists()  # nothing written, nothing trained


def test_the_digits_task_and_the_probe_need_the_suite_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from restune.pretraining.probe import digits_data
    from restune.suite.tasks import digit_data

    block(monkeypatch, "sklearn", "sklearn.datasets", "sklearn.model_selection")
    with pytest.raises(ImportError, match=r"needs scikit-learn: pip install 'restune\[suite\]'"):
        digit_data.__wrapped__()  # past the lru_cache, which may hold the scans from another test
    with pytest.raises(ImportError, match=r"pip install 'restune\[suite\]'"):
        digits_data()


def test_the_bench_peer_needs_the_peft_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from restune.bench.configs import build

    block(monkeypatch, "peft")
    with pytest.raises(ImportError, match=r"needs peft: pip install 'restune\[peft\]'"):
        build("peft_lora", nn.Linear(2, 2))

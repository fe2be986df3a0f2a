"""Lazy public names (spam_hf/lazy.py): importing the packages imports no torch, every public name resolves to
what its module defines, and a name never resolves to a submodule of the same name."""

import importlib
import subprocess
import sys

import pytest


def test_importing_the_packages_and_the_pruning_config_imports_no_torch():
    code = ("import sys, spam_hf, spam_hf.pruning; from spam_hf.pruning.config import PruningConfig; "
            "PruningConfig(sparsity=0.7, method='opd'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("package", ["spam_hf", "spam_hf.pruning"])
def test_every_public_name_resolves_to_its_definition(package):
    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert not isinstance(value, type(sys)), f"{package}.{name} is a module"
        assert name in dir(pkg)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        pkg.nothing


def test_plan_stays_the_function_after_its_module_is_imported():
    import spam_hf.pruning
    import spam_hf.pruning.planning as planning

    from spam_hf.pruning import plan

    assert plan is planning.plan and spam_hf.pruning.plan is planning.plan and callable(plan)

"""A missing optional package (the `eval` extra) is one error line naming the package and the pip command,
before any image is read; simulated by hiding the package from the import system."""
import sys

import pytest

from nlip_ds.optional import MissingPackage, require


@pytest.mark.parametrize("module, package", [("sklearn", "scikit-learn"), ("pycocoevalcap", "pycocoevalcap")])
def test_require_names_the_package_and_the_pip_command(monkeypatch, module, package):
    require(module, "x")  # installed here: no error
    monkeypatch.setitem(sys.modules, module, None)  # what `import` then finds: nothing
    with pytest.raises(MissingPackage, match=rf"x needs the package {package}, which is not installed: "
                                             rf"pip install {package}  \(or pip install 'nlip-ds\[eval\]'\)"):
        require(module, "x")


@pytest.mark.parametrize("module, args", [
    ("pycocoevalcap", ["--task", "caption"]),
    ("sklearn", ["--task", "zeroshot", "--linear-probe", "--train-data", "{test}"]),
])
def test_eval_reports_a_missing_package_in_one_line(cli, monkeypatch, random_export, synth_dir, module, args):
    monkeypatch.setitem(sys.modules, module, None)
    args = [a.format(test=synth_dir / "test") for a in args]
    status, out, err = cli("eval", "--checkpoint", random_export, "--data", synth_dir / "test", *args,
                           "--no-tensorboard")
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("nlip-ds eval: error: ") and "pip install" in err and out == ""

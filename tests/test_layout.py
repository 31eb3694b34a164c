"""The checkout must not shadow other installed packages.

``python -m pytest`` (the README's test command) and ``python -m copsd`` put the working directory first on
``sys.path``, so a top-level package or module of the checkout wins over an installed one of the same name.  The
Triton package once lived in ``kernels/``: when transformers 5.25 began to install and import Hugging Face's
``kernels`` package, every model construction run from the checkout imported copsd's directory instead and failed.
"""

import importlib.metadata
import importlib.util
from pathlib import Path

from oplib import run_json

ROOT = Path(__file__).resolve().parents[1]
OUR_DISTRIBUTION = "copsd"


def shadowing_names(root):
    """Import names that ``root`` on ``sys.path`` provides ahead of site-packages: regular packages (a directory
    with ``__init__.py``) and modules.  A directory without ``__init__.py`` is only a namespace portion, which
    an installed package of the same name still beats."""
    names = {}
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name.isidentifier() and (entry / "__init__.py").exists():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = entry
    return names


def test_the_checkout_provides_only_copsds_packages():
    names = shadowing_names(ROOT)
    assert {"copsd", "copsd_kernels"} <= set(names), names
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in names
               if set(installed.get(name, ())) - {OUR_DISTRIBUTION}}
    assert not clashes, (
        f"top-level names of the checkout shadow installed distributions when Python runs from {ROOT}: {clashes}")


def test_the_finder_sees_a_shadowing_package(tmp_path):
    # The check above on a made-up checkout: a package named like an installed distribution's module is found,
    # a plain directory and a non-identifier name are not.
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "__init__.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "not-a-name.py").write_text("")
    names = shadowing_names(tmp_path)
    assert set(names) == {"yaml", "setup"}
    assert "PyYAML" in importlib.metadata.packages_distributions()["yaml"]


def test_installed_packages_win_when_run_from_the_checkout():
    # Every installed top-level module that copsd's own imports may pull in (transformers imports `kernels`)
    # resolves outside the checkout, in a process started the way the README's commands start one.
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in sys.argv[1:]}))")
    wanted = [n for n in ("kernels", "transformers", "accelerate", "safetensors", "tokenizers", "yaml")
              if importlib.util.find_spec(n) is not None]
    origins = run_json(code, args=wanted, cwd=ROOT)
    inside = {n: o for n, o in origins.items() if o and Path(o).resolve().is_relative_to(ROOT)
              and ".venv" not in Path(o).resolve().relative_to(ROOT).parts}
    assert not inside, f"installed packages shadowed by the checkout: {inside}"

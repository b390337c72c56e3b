"""The shared config mechanism: files, flags, and the errors a user sees for typos and wrong types."""
import glob
import os

import pytest

from conftest import ROOT
from configurator import configure


def defaults():
    return {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "out_dir": "out", "top_k": None,
            "betas": (0.9, 0.95), "VERSION": 1, "__doc__": "a test script", "_private": 1}


def test_file_then_flags_override_in_order(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 32\nlearning_rate = 1e-3\nimport math\n_helper = 3\n")
    g = defaults()
    cfg = configure(g, [str(cfg_file), "--batch_size=64", "--compile=False", "--out_dir=123",
                        "--top_k=5", "--learning_rate=1", "--betas=(0.9, 0.99)"])
    assert cfg == {"batch_size": 64, "learning_rate": 1.0, "compile": False, "out_dir": "123",
                   "top_k": 5, "betas": (0.9, 0.99)}
    assert g["batch_size"] == 64 and g["out_dir"] == "123"  # globals updated in place
    assert isinstance(g["learning_rate"], float)


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'batch_sise'.*batch_size"):
        configure(defaults(), ["--batch_sise=3"])
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("learning_rat = 1e-3\n")
    with pytest.raises(SystemExit, match="unknown config key 'learning_rat'.*learning_rate"):
        configure(defaults(), [str(cfg_file)])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(SystemExit, match="'batch_size' expects int.*'abc'"):
        configure(defaults(), ["--batch_size=abc"])
    with pytest.raises(SystemExit, match="'compile' expects bool"):
        configure(defaults(), ["--compile=1"])
    with pytest.raises(SystemExit, match="'batch_size' expects int.*2.5"):
        configure(defaults(), ["--batch_size=2.5"])


def test_missing_config_file_and_flag_without_value(tmp_path):
    with pytest.raises(SystemExit, match="cannot read config file '.*nope.py'"):
        configure(defaults(), [str(tmp_path / "nope.py")])
    with pytest.raises(SystemExit, match="needs a value"):
        configure(defaults(), ["--compile"])
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = (\n")
    with pytest.raises(SystemExit, match="config file .* failed: SyntaxError"):
        configure(defaults(), [str(bad)])


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--batch_size=12" in out and "_private" not in out and "VERSION" not in out


@pytest.mark.parametrize("name", ["train", "sample", "finetune", "eval", "export", "serve", "prepare"])
def test_help_shows_each_settings_description(name, capsys):
    """--help prints each setting beside the comment the script's source gives it (with the comment's
    indented continuation lines)."""
    import importlib
    import os
    from configurator import descriptions
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        configure(vars(module), ["--help"])
    settings = vars(module)["__settings__"]
    said = {k: v for k, v in descriptions(module.__file__).items() if k in settings}
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = out.split("settings (override with a config file and/or --key=value):")[1].splitlines()
    assert said and set(said) == set(settings), set(settings) - set(said)  # every setting says what it means
    for key, text in said.items():
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"--{key}="))
        assert text in " ".join(lines[at:at + 2]), (key, text)
    assert os.path.basename(module.__file__) == f"{name}.py"
    # a continuation line joins its setting's description
    if name == "finetune":
        assert said["header"].endswith("False = no header row: name the columns by number from 0 "
                                       "(--text_fields=5,6 --label_field=4)")


CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "config", "*.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_loads_into_its_script(name):
    """Each config/*.py (finetune_*: finetune.py's, the rest train.py's) sets only settings its script has,
    each of the right type, and a train config's shape makes a GPTConfig: a setting renamed in a script
    fails here, not in a user's first command."""
    import importlib
    from model import GPTConfig
    script = importlib.import_module("finetune" if name.startswith("finetune") else "train")
    g = dict(vars(script))  # a copy: the module's own settings stay as they are for other tests
    cfg = configure(g, [os.path.join(ROOT, "config", name)])
    assert cfg and set(cfg) <= set(g["__settings__"])
    if script.__name__ == "train":
        shape = {k: g[k] for k in script.SHAPE_KEYS if g[k] is not None}
        model = GPTConfig.preset(g["preset"], **shape)
        assert all(getattr(model, k) == v for k, v in shape.items())
        assert g["max_iters"] > 0 and 0 <= g["warmup_iters"] < g["max_iters"] and g["min_lr"] <= g["learning_rate"]

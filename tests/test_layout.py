"""The repository's shape, which every new script must keep: scripts import library modules and never
each other, and library modules print nothing unless asked."""
import ast
import glob
import os

import torch

from conftest import ROOT

LIBRARIES = {"atomic", "bpe", "checkpoint", "clean", "configurator", "decode", "device", "distill", "fsdp", "hf",
             "lora", "model", "process", "quantize", "rows", "score", "shards", "speculative", "training"}


def imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_scripts_import_library_modules_never_each_other():
    modules = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(ROOT, "*.py"))}
    scripts = set(modules) - LIBRARIES
    assert {"prepare", "train", "sample"} <= scripts and LIBRARIES <= set(modules)
    crossing = sorted(f"{m}.py imports {o}.py" for m in scripts for o in imports(modules[m]) & scripts - {m})
    assert crossing == []
    for lib in LIBRARIES:  # and a library never reaches up into a script
        assert imports(modules[lib]) & scripts == set(), lib
    for bench in glob.glob(os.path.join(ROOT, "bench", "*.py")):  # bench scripts may time prepare.py,
        assert imports(bench) & (scripts - {"prepare"}) == set(), bench  # but reuse no other script


def test_library_modules_import_each_other_without_a_circle():
    """Each library module is read after the ones it imports (lazy imports inside functions count too):
    two that import each other would be one module in two files, each working only once the other has."""
    modules = {lib: os.path.join(ROOT, f"{lib}.py") for lib in LIBRARIES}
    graph = {lib: imports(path) & LIBRARIES - {lib} for lib, path in modules.items()}

    def circle(path):  # depth first from path[-1]: the first path that comes back to a module on it
        for o in sorted(graph[path[-1]]):
            found = path[path.index(o):] + [o] if o in path else circle(path + [o])
            if found:
                return found
    circles = [" -> ".join(c) for c in map(circle, ([lib] for lib in sorted(LIBRARIES))) if c]
    assert circles == []
    assert graph["checkpoint"] >= {"model", "quantize"} and graph["quantize"] >= {"model"}  # the graph is read


def test_library_modules_print_nothing(capsys, tmp_path):
    from bpe import Tokenizer
    from checkpoint import load_model
    from decode import generate
    from model import GPT, GPTConfig
    from shards import read_shard, write_shard
    model = GPT(GPTConfig.preset("gpt2", n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=300))
    generate(model, torch.zeros(1, 1, dtype=torch.long), 3)
    tok = Tokenizer.train(["some text to learn a few merges from, some text"], 260)
    tok.save(str(tmp_path / "t.bpe"))
    write_shard(str(tmp_path / "s.bin"), [1, 2, 3])
    read_shard(str(tmp_path / "s.bin"))
    try:
        load_model(str(tmp_path / "missing"))
    except ValueError:
        pass
    assert capsys.readouterr() == ("", "")

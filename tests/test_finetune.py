"""finetune.py and lora.py on tiny models and data the tests write: the exact input transformations,
the auxiliary objective, LoRA against peft, each task type learned from local files, early stopping,
prediction, merging, metrics against sklearn/scipy, and bad input as one line."""
import copy
import csv
import dataclasses
import json
import random
import re

import pytest
import torch

import checkpoint
import finetune
import lora
from bpe import Tokenizer
from configurator import run
from conftest import fake_clock
from model import GPT, GPTConfig

LETTERS = "abcdefgh"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread buys nothing, and on 2 shared cores its spinning
    made a step up to 5x slower (as conftest's OMP_NUM_THREADS=1 does for the scripts it starts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def byte_tokenizer():
    """256 byte tokens + <|endoftext|>: each letter is one token, so expected ids are readable."""
    return Tokenizer.train(["abc"], 257)


def write_base(path, n_embd=32, seed=0, n_layer=2, tok=None):
    """A (random) 'pretrained' model as train.py saves one: what --model reads (on the byte tokenizer
    unless given another)."""
    tok = tok or byte_tokenizer()
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig.preset("gpt2", n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=32,
                               vocab_size=tok.vocab_size))
    torch.save({"version": checkpoint.VERSION, "model": gpt.state_dict(), "model_args": dataclasses.asdict(gpt.config),
                "tokenizer": tok.dumps(), "iter_num": 0}, path)
    return str(path)


def write(path, rows, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # csv or GLUE-style tsv (unquoted)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",",
                               quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
            w.writeheader()
            w.writerows(rows)


# Synthetic tasks that a randomly initialised 2-layer, 32-wide model learns in 100-200 steps. Every
# label needs both texts (or the context and a choice), and the classes are balanced, so 95% is no
# fluke. (Whether a word of one text occurs in the other, the natural entailment, takes such a model
# thousands of steps from scratch: too slow for a test.)
def text(r, marks=""):
    """2-5 letters of c..h, with each letter of marks put in at a random place."""
    s = [r.choice(LETTERS[2:]) for _ in range(r.randint(2, 5))]
    for m in marks:
        s[r.randrange(len(s))] = m
    return "".join(s)


HALF = 0.5 ** 0.5  # two independent events of this chance happen together half the time


def classification(r):  # does the text mention "a"?
    yes = r.random() < 0.5
    return {"text": text(r, "a" * yes), "label": "yes" if yes else "no"}


def entailment(r):  # does the premise mention "a" and the hypothesis "b"?
    p, h = r.random() < HALF, r.random() < HALF
    return {"premise": text(r, "a" * p), "hypothesis": text(r, "b" * h), "label": "entailment" if p and h else "neutral"}


def similarity(r):  # a symmetric relation: do both texts mention "a"?
    p, h = r.random() < HALF, r.random() < HALF
    return {"s1": text(r, "a" * p), "s2": text(r, "a" * h), "label": int(p and h)}


def multiple_choice(r):  # which of three letters is the context's letter?
    c = r.choice(LETTERS)
    choices = r.sample([x for x in LETTERS if x != c], 2)
    k = r.randrange(3)
    choices.insert(k, c)
    return {"context": c, "choices": choices, "label": k}


# task: (generator, file format, flags); 640 train examples are 20 steps an epoch. On random text the LM
# loss is noise that a from-scratch model spends its first steps on: the two pair tasks learn in a third
# of the steps without it (lm_coef=0), while the other two keep the paper's 0.5.
TASKS = {
    "classification": (classification, "csv", ["--text_fields=text", "--epochs=5"]),
    "entailment": (entailment, "jsonl", ["--text_fields=premise,hypothesis", "--epochs=3", "--lm_coef=0"]),
    "similarity": (similarity, "tsv", ["--text_fields=s1,s2", "--epochs=3", "--lm_coef=0"]),
    "multiple_choice": (multiple_choice, "jsonl", ["--text_fields=context", "--choice_fields=choices", "--epochs=10"]),
}
FAST = ["--device=cpu", "--dtype=float32", "--dropout=0.0", "--head_dropout=0.0", "--learning_rate=3e-3",
        "--warmup_frac=0.05", "--log_interval=50", "--seed=1"]


def make_task(d, task, n_train=640, n_val=200, seed=0):
    gen, fmt, flags = TASKS[task]
    r = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        write(d / f"{split}.{fmt}", [gen(r) for _ in range(n)], fmt)
    return [f"--data={d}", f"--task={task}", *flags]


def finetune_main(*args):
    return finetune.main([*FAST, *map(str, args)])


def one_line_error(capsys, *args):
    """Run finetune.py's main as the command line does; return its one-line error."""
    with pytest.raises(SystemExit) as e:
        run(finetune.main, [*FAST, *map(str, args)])
    assert e.value.code != 0
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


# ---- input transformations -------------------------------------------------------------------------

def test_each_task_type_gives_the_exact_token_sequence():
    tok = byte_tokenizer().with_special_tokens(finetune.SPECIAL)
    s, d, e = special = [tok.special_tokens[n] for n in finetune.SPECIAL]
    assert special == [257, 258, 259]  # the next free ids after <|endoftext|> (256)
    enc = lambda text: tok.encode(text)  # noqa: E731  one byte per token: "ab" -> [97, 98]
    assert finetune.transform("classification", [enc("ab")], [], special, 32) == ([[s, 97, 98, e]], 0)
    assert finetune.transform("entailment", [enc("ab"), enc("c")], [], special, 32) == ([[s, 97, 98, d, 99, e]], 0)
    assert finetune.transform("similarity", [enc("ab"), enc("c")], [], special, 32) == \
        ([[s, 97, 98, d, 99, e], [s, 99, d, 97, 98, e]], 0)  # both orders
    assert finetune.transform("multiple_choice", [enc("q")], [enc("x"), enc("yz")], special, 32) == \
        ([[s, 113, d, 120, e], [s, 113, d, 121, 122, e]], 0)
    # too long: the longest text loses a token from its end, one at a time (the first on ties), and the
    # cut is counted: 6 + 3 text tokens into 8 - 3 = 5 -> "abc" + "xyz" -> "ab" + "xyz"
    assert finetune.transform("entailment", [enc("abcdef"), enc("xyz")], [], special, 8) == \
        ([[s, 97, 98, d, 120, 121, 122, e]], 4)
    # the tensors one forward pass reads: right padding, the extract positions, and LM targets that
    # are the next text tokens only (never a task token or padding)
    idx, last, targets = finetune.collate([{"seqs": [[s, 97, 98, e]]}, {"seqs": [[s, 99, d, 100, 101, e]]}],
                                          special, "cpu")
    assert idx.tolist() == [[s, 97, 98, e, 0, 0], [s, 99, d, 100, 101, e]]
    assert last.tolist() == [3, 5]
    assert targets.tolist() == [[97, 98, -1, -1, -1, -1], [99, -1, 100, 101, -1, -1]]


def test_added_special_tokens_round_trip_for_our_bpe_and_for_gpt2(monkeypatch):
    tok = byte_tokenizer().with_special_tokens(finetune.SPECIAL)
    back = Tokenizer.loads(tok.dumps())
    assert back.special_tokens == tok.special_tokens and back.vocab_size == 260
    assert back.encode("<|start|>a<|extract|>", allowed_special="all") == [257, 97, 259]
    assert back.encode("<|start|>") == tok.encode("<|start|>") != [257]  # in data it is just text
    g = Tokenizer.gpt2().with_special_tokens(finetune.SPECIAL)  # the marker file works offline
    assert g.vocab_size == 50260 and [g.special_tokens[n] for n in finetune.SPECIAL] == [50257, 50258, 50259]
    assert Tokenizer.loads(g.dumps()).special_tokens == g.special_tokens
    assert Tokenizer.gpt2().dumps() == "bpe.py tokenizer v1\nname gpt2\ntiktoken gpt2\n"  # unchanged
    # encoding with them extends tiktoken's gpt2 encoding; offline here, so a stand-in with its shape
    import tiktoken
    stand_in = tiktoken.Encoding("gpt2", pat_str=tok.pattern, mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    g = Tokenizer.loads(g.dumps())
    assert g.encode("a<|extract|><|endoftext|>", allowed_special="all") == [97, 50259, 50256]
    assert g.decode([50257, 97]) == "<|start|>a"


def test_a_full_table_grows_for_the_task_tokens_and_keeps_its_rows():
    """GPT-2's 50,257 tokens sit in 50,304 rows, so 3 more fit; a table that is full grows instead."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=320)).eval()
    assert gpt.transformer.wte.weight.shape[0] == 320  # 320 is a multiple of 64: no spare row
    idx = torch.randint(0, 320, (2, 8))
    before = gpt(idx)[0]
    finetune.grow_vocab(gpt, 323)
    assert gpt.config.vocab_size == 323 and gpt.transformer.wte.weight.shape == (384, 16)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # still tied
    torch.testing.assert_close(gpt(idx)[0][..., :320], before, rtol=0, atol=1e-6)  # old tokens unchanged
    assert gpt(torch.tensor([[322]]))[0].shape == (1, 1, 323)  # a new id is accepted and scored


# ---- the objective -------------------------------------------------------------------------------------

def test_auxiliary_lm_loss_is_added_with_its_weight():
    torch.manual_seed(0)
    tok = byte_tokenizer()
    gpt = GPT(GPTConfig.preset("gpt2", n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tok.vocab_size))
    spec = {"task": "entailment", "text_fields": ["p", "h"], "choice_fields": [], "label_field": "label",
            "regression": False, "max_len": 32, "labels": ["no", "yes"], "n_choices": None, "lora": None}
    model, tok = finetune.build(gpt, tok, spec)
    model.eval()
    rows = [{"p": "abc", "h": "d", "label": "yes"}, {"p": "hello there", "h": "x", "label": "no"}]
    examples, _, _ = finetune.make_examples(rows, spec, tok, "train", True)
    batch, y = finetune.collate(examples, spec["special"], "cpu"), torch.tensor([1, 0])
    idx, last, targets = batch
    # computed independently: the head on the extract states, and the model's own per-token LM loss
    x = gpt.hidden_states(idx)[torch.arange(2), last]
    task = torch.nn.functional.cross_entropy(model.head(x), y, reduction="none")
    _, per_token = gpt(idx, targets, reduction="none")
    lm = per_token.sum(1) / (targets >= 0).sum(1)
    assert (targets >= 0).sum().item() == 3 + 1 + 11 + 1  # every text token, each text's first from start/delim
    for coef in (0.0, 0.5):
        total, task_sum, lm_sum = finetune.objective(model, batch, y, spec, coef)
        torch.testing.assert_close(total, (task + coef * lm).sum(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(task_sum, task.sum(), rtol=1e-6, atol=1e-6)
    assert lm.min() > 1.0  # an untrained model: the LM term is far from zero, so the 0.5 above matters


# ---- LoRA ----------------------------------------------------------------------------------------------

def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("gpt2", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)).eval()


def test_lora_starts_at_the_base_merges_exactly_and_trains_only_its_adapters():
    base = tiny_gpt()
    model = copy.deepcopy(base)
    names = lora.add(model, ["attn.c_attn", "mlp.c_proj"], rank=4, alpha=8.0)
    assert names == [f"transformer.h.{i}.{t}" for i in (0, 1) for t in ("attn.c_attn", "mlp.c_proj")]
    idx = torch.randint(0, 100, (3, 16))
    assert torch.equal(model(idx)[0], base(idx)[0])  # B = 0: exactly the base model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{m}" for n in names for m in "AB"}
    with torch.no_grad():  # a trained adapter: B no longer zero
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(std=0.5)
    adapted = model(idx)[0]
    assert (adapted - base(idx)[0]).abs().max() > 1e-2  # the adapters change the output...
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())  # a plain GPT again
    torch.testing.assert_close(model(idx)[0], adapted, rtol=0, atol=1e-6)  # ...and merging keeps them
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        lora.add(copy.deepcopy(base), ["attn.q_proj"], 4, 8.0)


def test_lora_matches_peft():
    peft = pytest.importorskip("peft")
    base = tiny_gpt()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    lora.add(ours, ["attn.c_attn", "mlp.c_fc"], rank=4, alpha=8.0)

    class Holder(torch.nn.Module):  # peft looks for a Hugging Face config on the model it wraps
        def __init__(self, m):
            super().__init__()
            self.m = m

    wrapped = peft.get_peft_model(Holder(theirs), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                  lora_dropout=0.0))
    torch.manual_seed(1)
    copied = 0
    for name, m in ours.named_modules():
        if isinstance(m, lora.LoRALinear):
            with torch.no_grad():
                m.lora_B.normal_(std=0.3)
                layer = wrapped.base_model.model.m.get_submodule(name)
                layer.lora_A["default"].weight.copy_(m.lora_A)
                layer.lora_B["default"].weight.copy_(m.lora_B)
            copied += 1
    assert copied == 4
    assert sorted(n for n, p in wrapped.named_parameters() if p.requires_grad) == sorted(
        f"base_model.model.m.{n}.lora_{m}.default.weight" for n, mod in ours.named_modules()
        if isinstance(mod, lora.LoRALinear) for m in "AB")  # the same tensors train
    idx = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(ours(idx)[0], theirs(idx)[0], rtol=0, atol=1e-6)
    assert (ours(idx)[0] - base(idx)[0]).abs().max() > 1e-2
    merged_theirs = wrapped.merge_and_unload().m
    lora.merge(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, merged_theirs.state_dict()[k], rtol=0, atol=1e-6)


# ---- fine-tuning runs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_a_tiny_model_learns_each_task_type(task, tmp_path):
    base = write_base(tmp_path / "base.pt")
    res = finetune_main(f"--model={base}", f"--out_dir={tmp_path / 'out'}", "--eval_interval=50",
                        *make_task(tmp_path / "data", task))
    assert res["val"]["accuracy"] >= 0.95 and res["test"]["accuracy"] >= 0.95, res
    model, _, _, _ = finetune.load_finetuned(str(tmp_path / "out/best.pt"))
    assert res["trainable_params"] == sum(p.numel() for p in model.parameters())  # full fine-tuning: all


def test_early_stopping_keeps_the_best_and_prediction_writes_the_labels(tmp_path, capsys):
    base = write_base(tmp_path / "base.pt")
    out = tmp_path / "out"
    res = finetune_main(f"--model={base}", f"--out_dir={out}", "--epochs=50", "--eval_interval=25", "--patience=3",
                        *make_task(tmp_path / "data", "classification"), "--epochs=50")
    text = capsys.readouterr().out
    evals = [json.loads(line) for line in open(out / "log.jsonl") if "val_accuracy" in line]
    assert "early stop at step" in text and evals[-1]["step"] < 50 * 20  # stopped long before 1,000 steps
    acc = [e["val_accuracy"] for e in evals]
    best = acc.index(max(acc))  # the first evaluation to reach the best accuracy
    assert len(acc) - 1 - best == 3  # exactly `patience` evaluations after it
    assert res["best_step"] == evals[best]["step"] and res["val"]["accuracy"] == acc[best]
    assert res["val"]["loss"] == pytest.approx(evals[best]["val_loss"], abs=1e-6)  # best.pt is that step's model
    # predictions for new inputs, with the label names and probabilities
    rows = [{"text": t} for t in ("cdae", "cdef", "a", "hhhh")]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune_main(f"--out_dir={out}", f"--predict={tmp_path / 'new.jsonl'}")
    preds = [json.loads(line) for line in open(tmp_path / "new.predictions.jsonl")]
    assert [p["prediction"] for p in preds] == ["yes", "no", "yes", "no"]
    assert [p["text"] for p in preds] == [r["text"] for r in rows]
    for p in preds:
        assert set(p["probabilities"]) == {"no", "yes"} and p["probabilities"][p["prediction"]] > 0.5
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    # a table of inputs too, read as training reads one: the same predictions, each row as its file gives it
    write(tmp_path / "new.csv", rows, "csv")
    (tmp_path / "new.predictions.jsonl").unlink()
    finetune_main(f"--out_dir={out}", f"--predict={tmp_path / 'new.csv'}")
    assert [json.loads(line) for line in open(tmp_path / "new.predictions.jsonl")] == preds
    assert all(set(p) == {"text", "prediction", "probabilities"} for p in preds)


def test_step_time_leaves_out_evaluations_between_log_lines(tmp_path, monkeypatch):
    """On a clock where a step takes 1 s and an evaluation 100 s, every log line says 1000 ms per step,
    also when an evaluation falls between two log lines (eval_interval 3, log_interval 2)."""
    # objective runs once per micro-batch, and here a step is one micro-batch
    fake_clock(finetune, {"objective": 1.0, "score": 100.0}, set=monkeypatch.setattr)
    out = tmp_path / "out"
    finetune_main(f"--model={write_base(tmp_path / 'base.pt')}", f"--out_dir={out}", "--max_iters=8",
                  "--eval_interval=3", "--log_interval=2", *make_task(tmp_path / "data", "classification", 64, 16))
    steps = [json.loads(line) for line in open(out / "log.jsonl") if "ms_per_step" in line]
    assert [r["step"] for r in steps] == [2, 4, 6, 8] and [r["ms_per_step"] for r in steps] == [1000.0] * 4


def test_model_takes_a_run_directory_or_a_hugging_face_directory_and_the_old_flag_with_a_note(tmp_path, capsys):
    """--model names the base as every script's --model does (checkpoint.open_model): a run directory (its
    best.pt) or a Hugging Face directory export.py wrote. A LoRA checkpoint records the file or directory
    read, and finds its base there again. --init_from, the flag's old name, works with one note line."""
    import export
    (tmp_path / "run").mkdir()
    base = write_base(tmp_path / "run" / "best.pt")
    export.main([f"--model={base}", f"--hf_dir={tmp_path / 'hf'}", "--check=False"])
    task = make_task(tmp_path / "data", "classification", 64, 16)
    for flag, source, read in (("--model", tmp_path / "run", f"{base} (step 0)"),
                               ("--model", tmp_path / "hf", str(tmp_path / "hf")),
                               ("--init_from", tmp_path / "run", f"{base} (step 0)")):
        out = tmp_path / f"out-{source.name}{flag}"
        capsys.readouterr()
        finetune_main(f"{flag}={source}", f"--out_dir={out}", "--max_iters=2", "--lora_rank=2", *task)
        stdout, stderr = capsys.readouterr()
        assert f"model: {read}, bpe-257 tokenizer" in stdout
        assert [line for line in stderr.splitlines() if line.startswith("note:")] == (
            [f"note: --init_from is deprecated in finetune.py; use --model={source}"] if flag == "--init_from" else [])
        state = torch.load(out / "best.pt", weights_only=True)
        assert state["finetune"]["base"] == read.removesuffix(" (step 0)") and state["config"]["model"] == str(source)
        finetune.load_finetuned(str(out / "best.pt"))  # the adapters find their base again
    # the old name given its old default changes nothing, and says so
    assert "no data" in one_line_error(capsys, f"--model={base}", "--init_from=gpt2")
    assert "note: --init_from=gpt2 is deprecated in finetune.py and changes nothing: drop it" in capsys.readouterr().err


def test_lora_run_saves_only_adapters_and_merges_into_a_standalone_model(tmp_path):
    base = write_base(tmp_path / "base.pt", n_embd=64)
    out = tmp_path / "out"
    res = finetune_main(f"--model={base}", f"--out_dir={out}", "--eval_interval=100", "--lora_rank=4",
                        "--lora_alpha=8", "--learning_rate=1e-2", "--lora_targets=attn.c_attn,mlp.c_fc",
                        *make_task(tmp_path / "data", "classification"))
    assert res["val"]["accuracy"] >= 0.95, res
    state = torch.load(out / "best.pt", weights_only=True)
    assert "model" not in state and state["finetune"]["base"] == base
    assert sorted(state["adapters"]) == sorted(
        [f"transformer.h.{i}.{t}.lora_{m}" for i in (0, 1) for t in ("attn.c_attn", "mlp.c_fc") for m in "AB"]
        + ["transformer.wte.rows"])  # the adapters and the 3 task-token rows; the head is saved beside
    n_adapters = sum(v.numel() for v in state["adapters"].values())
    assert n_adapters == 2 * 4 * (64 + 192 + 64 + 256) + 3 * 64
    assert res["trainable_params"] == n_adapters + 64 * 2 + 2  # + the head: two classes
    full = sum(p.numel() for p in checkpoint.load_model(base)[0].parameters())
    # AdamW keeps two float32 moments per trained number (and a step count per tensor)
    assert res["optimizer_state_bytes"] == 2 * 4 * res["trainable_params"] + 4 * (len(state["adapters"]) + 2)
    assert res["trainable_params"] < full / 20
    with pytest.raises(ValueError, match="holds LoRA adapters, not a whole model; .* --merge=merged.pt"):
        checkpoint.load_model(str(out / "best.pt"))  # sample.py, eval.py, serve.py: one line, not a KeyError
    # merged: a plain model in train.py's format, which load_model reads, and the same predictions
    merged = tmp_path / "merged.pt"
    finetune_main(f"--out_dir={out}", f"--merge={merged}")
    gpt, tok, _ = checkpoint.load_model(str(merged))
    assert tok.vocab_size == 260 and gpt.config.vocab_size == 260
    adapted, _, spec, _ = finetune.load_finetuned(str(out / "best.pt"))
    standalone, _, _, _ = finetune.load_finetuned(str(merged))
    r = random.Random(5)
    examples, _, _ = finetune.make_examples([classification(r) for _ in range(50)], spec, tok, "t", True)
    ctx = torch.autocast("cpu", enabled=False)
    a = finetune.outputs(adapted, examples, spec, 16, ctx, "cpu")
    b = finetune.outputs(standalone, examples, spec, 16, ctx, "cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # a base that changed under the adapters is refused
    write_base(tmp_path / "base.pt", n_embd=64, seed=1)
    with pytest.raises(ValueError, match="has changed"):
        finetune.load_finetuned(str(out / "best.pt"))


def test_qlora_learns_on_a_4_bit_base_and_merges_into_a_float_model(tmp_path, capsys):
    """QLoRA: the blocks' Linears frozen in int4 under the adapters. It learns the task to at least 90% of
    what LoRA on the float base reaches; its checkpoint holds the same adapters; the base it rebuilds is
    4-bit; merging dequantizes it, and the merged float model labels as the QLoRA model does."""
    import quantize
    base = write_base(tmp_path / "base.pt", n_embd=64)
    task = make_task(tmp_path / "data", "classification")
    flags = [f"--model={base}", "--eval_interval=100", "--lora_rank=4", "--lora_alpha=8", "--learning_rate=1e-2",
             *task]
    full = finetune_main(*flags, f"--out_dir={tmp_path / 'lora'}")
    four = finetune_main(*flags, "--base_bits=4", "--base_group_size=32", f"--out_dir={tmp_path / 'qlora'}")
    assert four["val"]["accuracy"] >= 0.9 * full["val"]["accuracy"] and four["val"]["accuracy"] > 0.8, (four, full)
    assert four["trainable_params"] == full["trainable_params"]
    adapted, tok, spec, _ = finetune.load_finetuned(str(tmp_path / "qlora" / "best.pt"))
    assert spec["lora"]["bits"] == 4
    block = adapted.gpt.transformer.h[0]
    assert isinstance(block.attn.c_attn.base, quantize.Int4Linear) and isinstance(block.mlp.c_fc.base, quantize.Int4Linear)
    layer, x = block.mlp.c_fc.base, torch.randn(3, 64, requires_grad=True)  # gradients pass through the frozen base
    (layer(x) * torch.arange(256.0)).sum().backward()
    torch.testing.assert_close(x.grad, (torch.arange(256.0) @ layer.dequantize()).expand(3, 64))
    merged = tmp_path / "merged.pt"
    finetune_main(f"--out_dir={tmp_path / 'qlora'}", f"--merge={merged}")
    assert "the 4-bit base dequantized to float32" in capsys.readouterr().out
    standalone, _, _, _ = finetune.load_finetuned(str(merged))
    assert not any(isinstance(m, quantize.Int4Linear) for m in standalone.modules())
    examples, _, _ = finetune.make_examples([classification(random.Random(5)) for _ in range(50)], spec, tok, "t", True)
    ctx = torch.autocast("cpu", enabled=False)
    a = finetune.outputs(adapted, examples, spec, 16, ctx, "cpu")
    b = finetune.outputs(standalone, examples, spec, 16, ctx, "cpu")
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95  # the int4 kernel rounds inputs to bf16
    torch.testing.assert_close(a, b, rtol=0, atol=0.1)
    assert "add --lora_rank=8" in one_line_error(capsys, "--base_bits=4", *task, f"--out_dir={tmp_path / 'x'}")
    assert "base_bits=3" in one_line_error(capsys, "--base_bits=3", "--lora_rank=4", *task, f"--out_dir={tmp_path / 'y'}")


def test_regression_scores_pearson_and_carves_val_off_train(tmp_path, capsys):
    r = random.Random(0)
    rows = []
    for _ in range(600):  # the number of texts that mention "a": 0, 1 or 2, as a real number
        p, h = r.random() < 0.5, r.random() < 0.5
        rows.append({"s1": text(r, "a" * p), "s2": text(r, "a" * h), "score": float(p + h)})
    write(tmp_path / "all.jsonl", rows, "jsonl")
    base = write_base(tmp_path / "base.pt")
    res = finetune_main(f"--model={base}", f"--out_dir={tmp_path / 'out'}", f"--data={tmp_path / 'all.jsonl'}",
                        "--task=similarity", "--text_fields=s1,s2", "--label_field=score", "--regression=True",
                        "--epochs=5", "--eval_interval=100", "--val_fraction=0.2")
    assert "120 of the 600 train rows carved off as val" in capsys.readouterr().out
    # Spearman stays below 1 even for perfect predictions: the labels hold only three values, all tied
    assert res["val"]["pearson"] > 0.95 and res["val"]["spearman"] > 0.8 and "test" not in res, res


# ---- data sources and bad input ------------------------------------------------------------------------------

def test_hub_datasets_go_through_load_dataset_with_class_names(tmp_path, monkeypatch, capsys):
    """The hub is unreachable here, so load_dataset is replaced by one that returns what GLUE's sst2
    returns: ClassLabel features, a 'validation' split, and a test split whose labels are all -1."""
    datasets = pytest.importorskip("datasets")
    r, calls = random.Random(0), []
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(n, labelled=True):
        rows = [classification(r) for _ in range(n)]
        return datasets.Dataset.from_dict({"sentence": [x["text"] for x in rows],
                                           "label": [int(x["label"] == "yes") if labelled else -1 for x in rows]},
                                          features=features)

    def load_dataset(name, config=None, **kw):
        calls.append((name, config))
        return datasets.DatasetDict(train=split(640), validation=split(100), test=split(50, labelled=False))

    def offline(name, config=None, **kw):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe of the hub: load_dataset is the fake below
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert "cannot load data='nyu-mll/glue' data_config='sst2': ConnectionError: Couldn't reach" in one_line_error(
        capsys, f"--out_dir={tmp_path / 'out-offline'}", "--data=nyu-mll/glue", "--data_config=sst2",
        f"--model={write_base(tmp_path / 'base.pt')}")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    res = finetune_main(f"--model={write_base(tmp_path / 'base.pt')}", f"--out_dir={tmp_path / 'out'}",
                        "--data=nyu-mll/glue", "--data_config=sst2", "--epochs=5", "--eval_interval=100")
    assert calls == [("nyu-mll/glue", "sst2")]
    state = torch.load(tmp_path / "out/best.pt", weights_only=True)
    assert state["finetune"]["labels"] == ["negative", "positive"]  # the dataset's names, in its id order
    assert res["val"]["accuracy"] >= 0.95 and "test" not in res  # unlabelled test: not scored


def test_bad_input_is_one_line_naming_the_row(tmp_path, capsys):
    base = write_base(tmp_path / "base.pt")
    args = [f"--model={base}", "--epochs=1", "--batch_size=4", "--micro_batch_size=4"]
    good = [{"premise": "ab", "hypothesis": "a", "label": "yes"}, {"premise": "bc", "hypothesis": "a", "label": "no"}] * 4

    def case(name, train, val, *extra):
        d = tmp_path / name
        write(d / "train.jsonl", train, "jsonl")
        if val is not None:
            (d / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in val))
        return one_line_error(capsys, *args, f"--out_dir={tmp_path / ('out-' + name)}", f"--data={d}",
                              "--task=entailment", "--text_fields=premise,hypothesis", *extra)

    assert "train.jsonl line 3 has no label field 'label'" in case(
        "nolabel", good[:2] + [{"premise": "a", "hypothesis": "b"}] + good[3:], good)
    assert "val.jsonl line 2: label 'maybe' never occurs in training (labels: no, yes)" in case(
        "unseen", good, [good[0], {**good[1], "label": "maybe"}])
    assert "the val split is empty" in case("empty", good, [])
    assert "train.jsonl line 2 has no field 'hypothesis'" in case(
        "nofield", good[:1] + [{"premise": "ab", "label": "yes"}] + good[2:], good)
    mc = [{"q": "a", "options": ["a", "b"], "label": 0}] * 4 + [{"q": "a", "options": ["a", "b", "c"], "label": 0}] * 4
    d = tmp_path / "mc"
    write(d / "train.jsonl", mc, "jsonl")
    write(d / "val.jsonl", mc, "jsonl")
    assert "mc/train.jsonl line 5 has 3, others 2" in one_line_error(
        capsys, *args, f"--out_dir={tmp_path / 'out-mc'}", f"--data={d}", "--task=multiple_choice",
        "--text_fields=q", "--choice_fields=options")
    # prediction and merging need a fine-tuned model, and say so
    assert "no fine-tuned model 'best' in" in one_line_error(capsys, f"--out_dir={tmp_path / 'none'}", "--predict=x.jsonl")
    assert "is not a finetune.py checkpoint" in one_line_error(capsys, f"--ckpt={base}", "--merge=m.pt")
    # a context longer than max_len is cut and counted, not dropped
    long = [{"premise": "b" * 40, "hypothesis": "a", "label": "yes"}, {"premise": "c", "hypothesis": "a", "label": "no"}] * 4
    write(tmp_path / "long/train.jsonl", long, "jsonl")
    write(tmp_path / "long/val.jsonl", long, "jsonl")
    finetune_main(*args, f"--out_dir={tmp_path / 'out-long'}", f"--data={tmp_path / 'long'}", "--task=entailment",
                  "--text_fields=premise,hypothesis", "--max_len=16")
    out = capsys.readouterr().out
    assert "train: 8 examples; 4 longer than max_len=16 were cut from the end of their longest text " \
           "(112 tokens in all)" in out  # 40 + 1 + 3 task tokens = 44 -> 16: 28 cut, 4 times


# ---- metrics -------------------------------------------------------------------------------------------------

def test_metrics_agree_with_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    spec = {"task": "classification", "regression": False}
    for k in (2, 3):
        out, y = torch.randn(200, k, generator=g), torch.randint(0, k, (200,), generator=g)
        out[:120] += 2 * torch.nn.functional.one_hot(y[:120], k)  # better than chance
        m, pred = finetune.metrics(out, y, spec), out.argmax(1).numpy()
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
        assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(y, pred))
        assert m["loss"] == pytest.approx(sk.log_loss(y, out.softmax(1).numpy(), labels=list(range(k))), rel=1e-5)
        if k == 2:
            assert m["f1"] == pytest.approx(sk.f1_score(y, pred))
    pred, y = torch.randn(100, 1, generator=g), torch.randint(0, 6, (100,), generator=g).float()  # ties in y
    pred[:, 0] += y
    m = finetune.metrics(pred, y, {"task": "similarity", "regression": True})
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred[:, 0], y)[0], abs=1e-6)
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred[:, 0], y)[0], abs=1e-6)
    assert m["loss"] == pytest.approx(sk.mean_squared_error(y, pred[:, 0]), rel=1e-5)


def test_ddp_two_processes_match_one(tmp_path):
    """Under torchrun each of 2 ranks takes half of every batch of 32 (here in micro-batches of 8), and
    DDP averages their gradients: the same steps as one process, up to float summation order. The
    ranks split the val set too and gather the outputs, so both see every example."""
    import subprocess
    import sys
    from conftest import ENV, ROOT
    base = write_base(tmp_path / "base.pt")
    args = [*FAST, f"--model={base}", *make_task(tmp_path / "data", "classification"), "--max_iters=10",
            "--eval_interval=5", "--log_interval=1", "--micro_batch_size=8"]
    script = f"{ROOT}/finetune.py"
    for out, cmd in (("one", [sys.executable, script]),
                     ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script])):
        p = subprocess.run([*cmd, *args, f"--out_dir={tmp_path / out}"], env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    logs = {out: [json.loads(line) for line in open(tmp_path / out / "log.jsonl")] for out in ("one", "two")}
    one, two = ([r for r in logs[k] if "loss" in r] for k in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 11))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    assert one[-1]["loss"] < one[0]["loss"] - 0.3  # and they trained
    final = {k: logs[k][-1]["final"] for k in logs}
    assert final["one"]["val"] == pytest.approx(final["two"]["val"], rel=1e-4)


# ---- raw files as their benchmarks ship them -------------------------------------------------------------

STORY_CLOZE = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
               "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


def test_story_cloze_csv_fine_tunes_with_flags_alone(tmp_path, capsys):
    """Story Cloze's csv: four context sentences, two endings, and the right one numbered 1 or 2."""
    r = random.Random(0)
    path = tmp_path / "cloze_test_val__spring2016.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STORY_CLOZE)
        for i in range(48):
            c = r.choice(LETTERS)
            right, wrong = c + "e", r.choice([x for x in LETTERS if x != c]) + "e"
            k = r.randint(1, 2)
            w.writerow([f"id-{i}", f"{c}b, c.", "d", "e", "f"] + ([right, wrong] if k == 1 else [wrong, right]) + [k])
    flags = [f"--model={write_base(tmp_path / 'base.pt')}", f"--data={path}", "--task=multiple_choice",
             "--text_fields=InputSentence1,InputSentence2,InputSentence3,InputSentence4",
             "--choice_fields=RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2", "--label_field=AnswerRightEnding",
             "--max_iters=2", "--batch_size=8", "--micro_batch_size=8"]
    # without label_base=1 a 2 is no choice of two: the message says how labels count, and names the line
    message = one_line_error(capsys, *flags, f"--out_dir={tmp_path / 'out0'}")
    n = int(re.search(r"cloze_test_val__spring2016.csv line (\d+): label '2' is not a choice number 0..1", message)[1])
    assert path.read_text().splitlines()[n - 1].endswith(",2")  # the line as it is in the file
    assert "pass --label_base=1" in message
    res = finetune_main(*flags, "--label_base=1", f"--out_dir={tmp_path / 'out'}")
    assert 0 <= res["val"]["accuracy"] <= 1
    model, tok, spec, _ = finetune.load_finetuned(str(tmp_path / "out/best.pt"))
    assert spec["n_choices"] == 2 and spec["label_base"] == 1 and spec["context_separator"] == " "
    row = dict(zip(STORY_CLOZE, ["x", "ab, c.", "d", "e", "f", "ge", "he", "2"]))
    (ex,), _, _ = finetune.make_examples([row], spec, tok, "t", True)
    s, d, e = spec["special"]
    assert ex["y"] == 1 and ex["seqs"] == [[s, *tok.encode("ab, c. d e f"), d, *tok.encode(x), e] for x in ("ge", "he")]


def sts_line(r, i, extra=False):
    """A line of STS-B's sts-*.csv: genre, filename, year, id, score, sentence1, sentence2 (tab-separated,
    no header, unquoted; a few lines carry more columns)."""
    p, h = r.random() < 0.5, r.random() < 0.5
    cells = ["main-captions", "MSRvid", "2012test", f"{i:04d}", f"{p + h + r.random() / 4:.3f}", text(r, "a" * p) + ' "q',
             text(r, "a" * h)]
    return "\t".join(cells + (["extra\tcolumns"] if extra else [])) + "\n"


def test_sts_b_files_fine_tune_with_flags_alone(tmp_path, capsys):
    r = random.Random(0)
    d = tmp_path / "stsbenchmark"
    d.mkdir()
    for split, n in (("train", 64), ("dev", 16), ("test", 16)):
        (d / f"sts-{split}.csv").write_text("".join(sts_line(r, i, extra=i % 10 == 3) for i in range(n)))
    data = f"--data=train={d / 'sts-train.csv'},val={d / 'sts-dev.csv'},test={d / 'sts-test.csv'}"
    flags = [f"--model={write_base(tmp_path / 'base.pt')}", data, "--task=similarity", "--max_iters=2",
             "--batch_size=8", "--micro_batch_size=8"]
    # the first line is data, not a header: the message says so
    message = one_line_error(capsys, *flags, "--text_fields=5,6", "--label_field=4", f"--out_dir={tmp_path / 'o1'}")
    assert "sts-train.csv line 2: no field '5' for --text_fields" in message and "--header=False" in message
    message = one_line_error(capsys, *flags, "--text_fields=sentence1,sentence2", f"--out_dir={tmp_path / 'o2'}")
    assert "no field 'sentence1' for --text_fields" in message and "--header=False" in message
    # real-valued labels without --regression: one short line that says to use it
    message = one_line_error(capsys, *flags, "--header=False", "--text_fields=5,6", "--label_field=4",
                             f"--out_dir={tmp_path / 'o3'}")
    assert "real values rather than classes: pass --regression=True" in message and len(message) < 300
    res = finetune_main(*flags, "--header=False", "--text_fields=5,6", "--label_field=4", "--regression=True",
                        f"--out_dir={tmp_path / 'out'}")
    assert "pearson" in res["val"] and "pearson" in res["test"]
    out = capsys.readouterr().out
    assert "train: 64 examples" in out and "val: 16 examples" in out and "test: 16 examples" in out


def test_a_tab_separated_csv_is_read_by_its_content_and_merge_needs_a_file(tmp_path, capsys):
    path = tmp_path / "x.csv"  # named .csv, separated by tabs
    r = random.Random(0)
    path.write_text("text\tlabel\n" + "".join(f"{x['text']}\t{x['label']}\n" for x in
                                               (classification(r) for _ in range(40))))
    base = write_base(tmp_path / "base.pt")
    res = finetune_main(f"--model={base}", f"--data={path}", "--text_fields=text", "--max_iters=2",
                        "--batch_size=8", "--micro_batch_size=8", f"--out_dir={tmp_path / 'out'}")
    assert "accuracy" in res["val"]
    assert torch.load(tmp_path / "out/best.pt", weights_only=True)["finetune"]["labels"] == ["no", "yes"]
    message = one_line_error(capsys, f"--out_dir={tmp_path / 'out'}", f"--merge={tmp_path}")
    assert f"--merge={tmp_path} is a folder; name the checkpoint file to write" in message


PER_RANK_DIR = """
import os, runpy, sys
os.makedirs(os.environ["RANK"], exist_ok=True)
os.chdir(os.environ["RANK"])  # each rank in its own folder: as if each node had its own disk
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_refusal_on_one_rank_ends_every_rank_with_one_line(tmp_path):
    """Under torchrun, rank 0 alone checks out_dir for an old run, and every rank reads best.pt back at the
    end: an out_dir that holds checkpoints, or that is not shared (each rank in its own folder here), ends
    the run at once on every rank, with one error line, before any training."""
    import subprocess
    import sys
    import time
    from conftest import ENV, ROOT
    base = write_base(tmp_path / "base.pt")
    (tmp_path / "per_rank.py").write_text(PER_RANK_DIR)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [*FAST, f"--model={base}", *make_task(tmp_path / "data", "classification", n_train=64, n_val=16),
            "--max_iters=2"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "ckpt_000004.pt").write_bytes(b"")
    for cmd, out, expected in (
            ([f"{ROOT}/finetune.py"], tmp_path / "old", f"error: {tmp_path / 'old'}/ already holds checkpoints of "
                                                        f"another run; use a new --out_dir (or delete it)"),
            ([str(tmp_path / "per_rank.py"), f"{ROOT}/finetune.py"], "out",
             "error: rank 1 cannot see out/, where rank 0 writes: out_dir must be on a filesystem every node shares")):
        start = time.time()
        p = subprocess.run([*torchrun, *cmd, *args, f"--out_dir={out}"], cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode != 0 and time.time() - start < 60
        # one line from the ranks (torchrun then prints its own summary of the failed workers)
        assert [line for line in p.stderr.splitlines() if line.startswith(("error", "[rank"))] == [expected], \
            p.stderr[-3000:]
    assert not (tmp_path / "1" / "out").exists()  # rank 1 never made a folder of its own

"""finetune.py's transfer_layers (GPT-1's figure 2, left: how many pretrained blocks a task keeps) and task
distillation (--teacher, --unlabeled: a fine-tuned model's outputs teach another), on tiny models and
the synthetic tasks of test_finetune.py."""
import random

import pytest
import torch

import distill
import finetune
from bpe import Tokenizer
from model import GPT, GPTConfig
from test_finetune import classification, finetune_main, make_task, one_line_error, write, write_base
from test_finetune import one_thread  # noqa: F401  (its autouse fixture: one torch thread here too)


# ---- transfer_layers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_transfer_layers_keeps_the_embeddings_and_k_blocks_and_starts_the_rest_as_a_new_model(k, tmp_path, capsys):
    """With learning_rate 0 the saved model is the one training started from: the base's embeddings,
    final norm and first k blocks bit for bit, and blocks k.. exactly a fresh GPT's init with the seed."""
    base = write_base(tmp_path / "base.pt", n_layer=4)
    finetune_main(f"--model={base}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1", "--learning_rate=0",
                  f"--transfer_layers={k}", "--seed=7", *make_task(tmp_path / "data", "classification", 64, 16))
    assert f"transfer_layers={k}: from {base} (step 0) the token embeddings, position embeddings, final norm " \
           f"and the first {k} of 4 blocks; {4 - k} block(s) initialised fresh (seed 7)" in capsys.readouterr().out
    saved = torch.load(tmp_path / "out/best.pt", weights_only=True)["model"]
    pretrained = torch.load(base, weights_only=True)
    torch.manual_seed(7)
    fresh = GPT(GPTConfig(**pretrained["model_args"])).state_dict()
    pretrained = pretrained["model"]
    assert set(saved) == set(pretrained)
    blocks = 0
    for name, w in saved.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):  # tied; rows 257-259 are the task tokens
            w, ref = torch.cat([w[:257], w[260:]]), torch.cat([pretrained[name][:257], pretrained[name][260:]])
            assert torch.equal(w, ref), name
        elif name.startswith("transformer.h.") and int(name.split(".")[2]) >= k:
            blocks += 1
            assert torch.equal(w, fresh[name]), name
            if not name.endswith((".bias", "ln_1.weight", "ln_2.weight")):  # N(0, 0.02): never the base's draw
                assert not torch.equal(w, pretrained[name]), name
        else:  # wpe, ln_f and the first k blocks
            assert torch.equal(w, pretrained[name]), name
    assert blocks == (4 - k) * len([n for n in pretrained if n.startswith("transformer.h.0.")])


def test_transfer_layers_refuses_more_blocks_than_the_model_has_and_lora(tmp_path, capsys):
    base = write_base(tmp_path / "base.pt")
    task = make_task(tmp_path / "data", "classification", 64, 16)
    assert "transfer_layers=3, but" in one_line_error(capsys, f"--model={base}", "--transfer_layers=3", *task)
    assert "not with LoRA" in one_line_error(capsys, f"--model={base}", "--transfer_layers=1", "--lora_rank=2", *task)


# ---- task distillation ------------------------------------------------------------------------------------

def test_distillation_loss_is_its_definition_with_its_gradient():
    """Per example: alpha T^2 KL(p_T || q_T) + (1 - alpha) CE(q, y), the CE on labelled rows only;
    d/ds = alpha T (q_T - p_T) + (1 - alpha) (q - onehot(y)), the second term on labelled rows only."""
    torch.manual_seed(0)
    s = (3 * torch.randn(5, 3)).requires_grad_()
    t = 3 * torch.randn(5, 3)
    y = torch.tensor([0, 2, -1, 1, -1])
    alpha, T = 0.3, 2.5
    loss = distill.task_loss(s, t, y, alpha, T)

    def softmax(x):
        e = x.exp()
        return e / e.sum(1, keepdim=True)
    p, q_T, q = softmax(t / T), softmax(s.detach() / T), softmax(s.detach())
    kl = (p * (p.log() - q_T.log())).sum(1)
    labelled = (y >= 0).float()
    ce = -q.log()[torch.arange(5), y.clamp(min=0)] * labelled
    torch.testing.assert_close(loss, alpha * T ** 2 * kl + (1 - alpha) * ce, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), 3).float()
    torch.testing.assert_close(s.grad, alpha * T * (q_T - p) + (1 - alpha) * (q - onehot) * labelled[:, None],
                               rtol=1e-5, atol=1e-6)
    assert (loss - alpha * T ** 2 * kl)[[0, 1, 3]].sum() > 1  # the labels' term matters where there are labels


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny model fine-tuned on test_finetune's classification task (does the text mention "a"?)."""
    d = tmp_path_factory.mktemp("teacher")
    res = finetune_main(f"--model={write_base(d / 'base.pt')}", f"--out_dir={d / 'out'}", "--eval_interval=50",
                        *make_task(d / "data", "classification"))
    assert res["test"]["accuracy"] >= 0.95, res
    return d


def predictions(run, rows):
    model, tok, spec, _ = finetune.load_finetuned(str(run / "best.pt"))
    examples, _, _ = finetune.make_examples(rows, spec, tok, "test", need_labels=False)
    return finetune.outputs(model, examples, spec, 64, torch.autocast("cpu", enabled=False), "cpu").argmax(1)


def test_a_smaller_student_learns_the_teachers_labels_from_few_labels_and_unlabeled_inputs(teacher_run, tmp_path,
                                                                                             capsys):
    """32 labelled inputs and 608 unlabeled ones: with the teacher's outputs a 16-wide student agrees with
    it on 95% of new inputs; from the 32 labels alone, in as many steps, it does not."""
    r = random.Random(1)
    rows = [classification(r) for _ in range(32 + 608 + 200 + 200)]
    d = tmp_path / "data"
    write(d / "train.csv", rows[:32], "csv")
    write(d / "unlabeled.jsonl", [{"text": x["text"]} for x in rows[32:640]], "jsonl")
    write(d / "val.csv", rows[640:840], "csv")
    write(d / "test.csv", rows[840:], "csv")
    student = write_base(tmp_path / "student.pt", n_embd=16, seed=3)
    flags = [f"--model={student}", f"--data={d}", "--text_fields=text", "--eval_interval=50", "--max_iters=100"]
    finetune_main(*flags, f"--out_dir={tmp_path / 'out'}", f"--teacher={teacher_run / 'out'}",
                  f"--unlabeled={d / 'unlabeled.jsonl'}")
    out = capsys.readouterr().out
    assert f"teacher {teacher_run / 'out' / 'best.pt'}: outputs for 32 train and 608 unlabeled inputs" in out
    assert "unlabeled: 608 inputs" in out and "100 steps of 32 examples (20 per epoch)" in out
    finetune_main(*flags, f"--out_dir={tmp_path / 'alone'}")
    test = [{"text": x["text"]} for x in rows[840:]]
    theirs = predictions(teacher_run / "out", test)
    taught = (predictions(tmp_path / "out", test) == theirs).float().mean()
    alone = (predictions(tmp_path / "alone", test) == theirs).float().mean()
    assert taught >= 0.95 and alone < taught - 0.05, (taught, alone)


def test_a_teacher_of_another_task_labels_or_tokenizer_is_refused_in_one_line(teacher_run, tmp_path, capsys):
    base = write_base(tmp_path / "base.pt")
    t = f"--teacher={teacher_run / 'out'}"
    task = make_task(tmp_path / "data", "classification", 64, 16)
    assert f"teacher {teacher_run / 'out' / 'best.pt'} was fine-tuned for classification into no, yes, this run is " \
           f"entailment into entailment, neutral" in one_line_error(
               capsys, f"--model={base}", t, *make_task(tmp_path / "pairs", "entailment", 64, 16))
    r = random.Random(0)
    other = [{"text": x["text"], "label": {"yes": "a", "no": "none"}[x["label"]]} for x in
             (classification(r) for _ in range(64))]
    write(tmp_path / "other/train.csv", other, "csv")
    assert "into a, none; distil from a teacher of the same task and labels" in one_line_error(
        capsys, f"--model={base}", t, f"--data={tmp_path / 'other/train.csv'}", "--text_fields=text")
    merged = write_base(tmp_path / "merged.pt", tok=Tokenizer.train(["abab abab abab"], 258))
    assert "reads the bpe-257 tokenizer (260 tokens), --model the bpe-258 tokenizer (261)" in one_line_error(
        capsys, f"--model={merged}", t, *task)
    assert "add --teacher=RUN" in one_line_error(capsys, f"--model={base}", f"--unlabeled={tmp_path}/x.jsonl", *task)
    assert "no such file" in one_line_error(capsys, f"--model={base}", t, f"--unlabeled={tmp_path}/x.jsonl", *task)
    assert "is not a finetune.py checkpoint" in one_line_error(capsys, f"--model={base}", f"--teacher={base}", *task)

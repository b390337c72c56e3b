"""
distill.py: knowledge distillation (Hinton et al. 2015), a student learning from a trained model's
whole next-token distribution rather than from the one observed token. train.py --teacher=RUN uses it:
load_teacher finds and freezes the teacher, step_loss is one micro-step's loss, and DistillLoss
computes the loss and its gradient. finetune.py --teacher=RUN distils a fine-tuned model's task outputs
(Tang et al. 2019) with task_loss, the same loss over (B, K) class logits, one row per example.

Memory. One (B, T, V) float32 tensor is 6.6 GB for gpt2_124m at 32 x 1024, so the design counts them.
Plain cross-entropy holds three at its peak: the logits, their log-softmax (kept for backward) and its
gradient. Written out with log_softmax and kl_div, distillation holds about seven (bench/README.md has
the figures). DistillLoss holds two: the student's logits, and the teacher's in the training dtype (the
teacher runs under the same autocast), both unavoidable since each model's head makes them whole. It
reads them in chunks of about 4M logits, (rows, V), and computes each chunk's loss and gradient at once
from three chunk-sized tensors; each chunk of the gradient is written over the chunk of the teacher's
logits it was computed from, which nothing reads again. After the forward the student's logits are
freed (the gradient does not need them) and only the gradient, in the teacher's storage, waits for
backward. Computing the gradient in backward instead would keep both logits alive until then and
still need a third (B, T, V) tensor to return it in.
"""
import torch
from torch.nn import functional as F

import checkpoint
from configurator import UserError
from device import for_inference


class DistillLoss(torch.autograd.Function):
    """Knowledge distillation (Hinton et al. 2015): alpha * T^2 * KL(teacher_T || student_T) + (1 -
    alpha) * cross-entropy with the targets, per scored token. Both distributions are softened by T;
    their gradients shrink as 1/T^2, which the T^2 undoes, so alpha keeps its meaning at any T.
    logits, teacher_logits (B, T, V); targets (B, T), -1 = not scored. Each chunk's gradient with
    respect to the student's logits,
        d loss / d logits = alpha * T * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y)),
    (each divided by the number of scored tokens) goes into one (B, T, V) tensor in the logits' dtype:
    teacher_logits itself with reuse_teacher (see the module's docstring), else a new one. Unscored rows
    are weighted by 0 rather than dropped with a boolean index, whose size the host would have to wait for."""

    @staticmethod
    def forward(ctx, logits, teacher_logits, targets, alpha, temperature, reuse_teacher):
        V = logits.size(-1)
        same = reuse_teacher and teacher_logits.dtype == logits.dtype
        grad = teacher_logits if same else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        s_all, t_all, g_all = logits.flatten(0, 1), teacher_logits.flatten(0, 1), grad.flatten(0, 1)  # (B*T, V) views
        y_all = targets.flatten()
        weight = (y_all != -1).float()
        weight /= weight.sum().clamp(min=1)  # a mean over the scored tokens
        total = torch.zeros((), device=logits.device)
        rows = max(1, 2 ** 22 // V)
        for i in range(0, len(y_all), rows):
            s, t, w = s_all[i:i + rows].float(), t_all[i:i + rows].float(), weight[i:i + rows, None]
            y = y_all[i:i + rows].clamp(min=0)[:, None]  # an unscored row's -1 read as 0, weighted 0
            teacher_T = (t / temperature).log_softmax(-1)  # (rows, V), as are the chunks below
            student_T = (s / temperature).log_softmax(-1)
            kl = (teacher_T - student_T).mul_(teacher_T.exp_()).sum(-1)  # teacher_T now holds softmax(t/T)
            g = student_T.exp_().sub_(teacher_T).mul_(alpha * temperature)
            del teacher_T
            student = s.log_softmax(-1)
            ce = -student.gather(1, y)[:, 0]
            total += ((alpha * temperature ** 2 * kl + (1 - alpha) * ce) * w[:, 0]).sum()
            g += student.exp_().scatter_add_(1, y, torch.full_like(student[:, :1], -1.0)).mul_(1 - alpha)
            g_all[i:i + rows] = g.mul_(w)  # over the teacher's chunk t (if reused), read above
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output), None, None, None, None, None


def distill_loss(logits, teacher_logits, targets, alpha, temperature, reuse_teacher=False):
    """DistillLoss: the loss, a scalar; logits (B, T, V) from the student get its gradient. reuse_teacher:
    the gradient is written over teacher_logits (when their dtypes match), which the caller must not read
    after; that saves a (B, T, V) tensor."""
    return DistillLoss.apply(logits, teacher_logits, targets, alpha, temperature, reuse_teacher)


def task_loss(logits, teacher_logits, targets, alpha, temperature):
    """Task distillation (Hinton et al. 2015; Tang et al. 2019): per example (B,), alpha * T^2 *
    KL(teacher_T || student_T) + (1 - alpha) * cross-entropy with the label, the last term only where
    there is one. logits, teacher_logits (B, K): class (or choice) scores; targets (B,), -1 = no label
    (an unlabeled input learns from the teacher alone). DistillLoss is this over a vocabulary, but it
    averages over scored tokens and drops the unscored ones entirely; here the teacher's term is on
    every row, and (B, K) is small enough for autograd to keep what it likes."""
    t = (teacher_logits.float() / temperature).log_softmax(-1)  # (B, K)
    s = (logits.float() / temperature).log_softmax(-1)
    soft = (t.exp() * (t - s)).sum(-1)  # KL, 0 when the student matches the teacher
    hard = F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")  # a -1 read as 0...
    return alpha * temperature ** 2 * soft + (1 - alpha) * torch.where(targets >= 0, hard, 0.0)  # ...and dropped


def step_loss(model, teacher_model, x, y, alpha=0.5, temperature=2.0):
    """One micro-step's loss: cross-entropy, or with a teacher the distillation loss. Neither model's
    (B, T, V) logits are kept by the caller: the student's are freed as soon as the loss is computed, and
    the teacher's, in the training dtype (it runs under the caller's autocast too), become the gradient."""
    if teacher_model is None:
        return model(x, y)[1]
    with torch.no_grad():
        teacher_logits = teacher_model(x)[0]
    return distill_loss(model(x)[0], teacher_logits, y, alpha, temperature, reuse_teacher=True)


def load_teacher(teacher, tokenizer, tok_path, T, dev, device_type, ptdtype, use_compile):
    """The model to distil from (teacher: a run directory, checkpoint or Hugging Face directory), checked
    against this run (the same tokenizer, a context of at least T) and frozen: eval mode (no dropout), no
    gradients, on dev, its weights in the training dtype on a GPU (device.for_inference) and compiled where
    the student is. Returns (model, where it came from)."""
    try:
        model, tok, where = checkpoint.load_model(teacher)
    except ValueError as e:
        raise UserError(f"teacher={teacher!r}: {e}")
    if tok.dumps() != tokenizer.dumps():  # the two distributions must be over the same ids
        raise UserError(f"teacher {where} uses the {tok.name} tokenizer, not this run's {tok_path}; "
                        f"distil from a teacher trained on data with the same tokenizer")
    if model.config.block_size < T:
        raise UserError(f"teacher {where} has a context of {model.config.block_size}, shorter than block_size={T}")
    model = for_inference(model.requires_grad_(False), dev, device_type, ptdtype)
    # the ids are the student's, from the tokenizer both share: checking them against the vocabulary
    # (min and max) would make the host wait for the GPU at every step
    model._check_input = lambda idx, start, cache=None: None
    return torch.compile(model) if use_compile else model, where

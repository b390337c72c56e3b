"""
distill.py: knowledge distillation (Hinton et al. 2015), a student learning from a trained model's
whole next-token distribution rather than from the one observed token. train.py --teacher=RUN uses it:
load_teacher finds and freezes the teacher, step_loss is one micro-step's loss, and DistillLoss
computes the loss and its gradient in chunks so that the (B, T, V) logits are not copied five times.
"""
import torch

import checkpoint
from configurator import UserError
from device import for_inference


class DistillLoss(torch.autograd.Function):
    """Knowledge distillation (Hinton et al. 2015): alpha * T^2 * KL(teacher_T || student_T) + (1 -
    alpha) * cross-entropy with the targets, per scored token. Both distributions are softened by T;
    their gradients shrink as 1/T^2, which the T^2 undoes, so alpha keeps its meaning at any T.
    logits, teacher_logits (B, T, V); targets (B, T), -1 = not scored.

    Memory. Written out with log_softmax and kl_div, autograd keeps about five float32 (B, T, V)
    tensors alive (6.6 GB each for gpt2_124m at 32 x 1024). Here the rows go through in chunks of
    about 4M logits, and each chunk's loss and its gradient with respect to the student's logits,
        d loss / d logits = alpha * T * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y)),
    (each divided by the number of scored tokens) are computed at once; the gradient, one tensor in
    the logits' dtype, is all that waits for backward. Unscored rows are weighted by 0 rather than
    dropped with a boolean index, whose size the host would have to wait for."""

    @staticmethod
    def forward(ctx, logits, teacher_logits, targets, alpha, temperature):
        V = logits.size(-1)
        s_all, t_all, y_all = logits.flatten(0, 1), teacher_logits.flatten(0, 1), targets.flatten()
        weight = (y_all != -1).float()
        weight /= weight.sum().clamp(min=1)  # a mean over the scored tokens
        grad = torch.empty(s_all.shape, dtype=logits.dtype, device=logits.device)
        total = torch.zeros((), device=logits.device)
        rows = max(1, 2 ** 22 // V)
        for i in range(0, len(y_all), rows):
            s, t, w = s_all[i:i + rows].float(), t_all[i:i + rows].float(), weight[i:i + rows]
            y = y_all[i:i + rows].clamp(min=0)[:, None]  # an unscored row's -1 read as 0, weighted 0
            student_T = (s / temperature).log_softmax(-1)
            teacher_T = (t / temperature).log_softmax(-1)
            student = s.log_softmax(-1)
            kl = (teacher_T.exp() * (teacher_T - student_T)).sum(-1)
            ce = -student.gather(1, y)[:, 0]
            total += ((alpha * temperature ** 2 * kl + (1 - alpha) * ce) * w).sum()
            g = student_T.exp_().sub_(teacher_T.exp_()).mul_(alpha * temperature)
            g += student.exp_().scatter_add_(1, y, torch.full_like(student[:, :1], -1.0)).mul_(1 - alpha)
            grad[i:i + rows] = g.mul_(w[:, None])
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output).view(ctx.shape), None, None, None, None


def distill_loss(logits, teacher_logits, targets, alpha, temperature):
    """DistillLoss: the loss, a scalar; logits (B, T, V) from the student get its gradient."""
    return DistillLoss.apply(logits, teacher_logits, targets, alpha, temperature)


def step_loss(model, teacher_model, x, y, alpha=0.5, temperature=2.0):
    """One micro-step's loss: cross-entropy, or with a teacher the distillation loss. Neither model's
    (B, T, V) logits are kept by the caller, so they are freed as soon as the loss is computed."""
    if teacher_model is None:
        return model(x, y)[1]
    with torch.no_grad():
        teacher_logits = teacher_model(x)[0]
    return distill_loss(model(x)[0], teacher_logits, y, alpha, temperature)


def load_teacher(teacher, tokenizer, tok_path, T, dev, device_type, ptdtype, use_compile):
    """The model to distil from (teacher: a run directory, checkpoint or Hugging Face directory), checked against this run (the same tokenizer, a context of at least
    T) and frozen: eval mode (no dropout), no gradients, on dev, its weights in the training dtype on
    a GPU (device.for_inference) and compiled where the student is. Returns (model, where it came from)."""
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

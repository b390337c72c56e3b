"""
speculative.py: speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling"). sample.py --draft=RUN uses it.

Plain decoding runs the whole target model once per token. At batch 1 on a GPU such a step is paid in
reading the weights, not in arithmetic, so scoring k + 1 tokens in one forward costs about as much as
scoring one. A small draft model (same tokenizer) therefore guesses k tokens, one cheap step each, and
the target scores the chunk [last token, d_1 .. d_k] in ONE forward (model.hidden_states: causal inside
the chunk, the whole cached prefix visible). That forward gives the target's distribution at every
position, p_1 .. p_{k+1}; p_i is the next-token distribution after the prefix and d_1 .. d_{i-1}, the
same context in which the draft drew d_i from its own q_i. Each round emits 1 to k + 1 tokens.

The rule. For i = 1 .. k: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)). At the first
rejection, emit a token drawn from norm(max(0, p_i - q_i)) instead and end the round; if all k are
accepted, emit a bonus token drawn from p_{k+1}. Why the emitted token is distributed exactly as p
(proved in Leviathan et al.'s appendix A): x comes out accepted with probability q(x) min(1, p(x)/q(x)) =
min(p(x), q(x)), or after a rejection, which happens with probability r = 1 - sum_y min(p(y), q(y)) and
is followed by x with probability max(0, p(x) - q(x)) / r (that residual sums to r as well); together
min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x). Every later position is conditioned on the token that was
emitted, so by induction the whole text is distributed as the target's own. temperature, top_k and
top_p shape p and q alike: both are the distribution decode.sample_next would draw from
(decode.filter_logits). Greedy (temperature 0 or top_k 1) makes them one-hot: a guess is kept exactly when
it is the target's argmax, a rejection emits that argmax, so the text is the target's greedy text. With
a per-token acceptance rate a, a round emits (1 - a^(k+1)) / (1 - a) tokens on average (Leviathan et al.
eq. 1): the speed-up needs a draft step much cheaper than a target step and a draft that agrees often.

The caches. Each model keeps a KVCache, and a row's rejected positions are dropped by lowering its
length (KVCache.pos). At a round's start the target has cached every token but the last, and the draft
is one token behind, or two after a round that accepted all k (it never ran on its last guess). Row b
holds n[b] tokens; rows accept different counts, so each has its own length in both caches and batch
B > 1 works (model.hidden_states gives rows at different lengths their own positions). Past the shorter
context no chunk fits, and the target alone continues each row as decode.generate_stream does.

Compiled (compile(), sample.py --draft with --compile=True): both models run on decode.py's static
caches, and their steps are compiled once each: the target's (k + 1)-token chunk, the draft's reads of 1
token and of 2 (after a round that accepted all k). A rollback only lowers a row's length, so the
columns past it are masked until overwritten. The lengths are kept on the host as well (tn, dn), which
a step needs without reading them back from the device.

Shapes: B rows, k guesses, V vocabulary: guesses (B, k), q (B, k, V), p (B, k + 1, V), accepted (B,).
"""
import itertools

import torch
from torch.nn import functional as F

from configurator import UserError
from decode import Decoder, filter_logits, generate_stream, sampling_problem
from model import KVCache


def check_draft(target, draft):
    """Refuse a draft (checkpoint.Opened, as target) whose tokenizer or vocabulary differs from the
    target's: its guesses would be ids of other tokens."""
    t, d = target, draft
    if d.tokenizer.dumps() != t.tokenizer.dumps() or d.model.config.vocab_size != t.model.config.vocab_size:
        raise UserError(f"the draft {d.description} and the target {t.description} differ in tokenizer or "
                        f"vocabulary (draft: {d.tokenizer.name}, {d.model.config.vocab_size} tokens; target: "
                        f"{t.tokenizer.name}, {t.model.config.vocab_size} tokens); pass a --draft trained on data "
                        f"prepared with the target's tokenizer")


def probs(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> (B, V) float32 probabilities: what decode.sample_next draws from with these
    settings, one-hot at the argmax for a greedy row."""
    onehot = F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    greedy, logits, order = filter_logits(logits, temperature, top_k, top_p)
    if logits is None:
        return onehot
    p = logits.softmax(dim=-1)  # (B, V), or (B, k) for the ids in order
    if order is not None:
        p = torch.zeros_like(onehot).scatter_(1, order, p)
    return torch.where(greedy, onehot, p)


class SpeculativeDecoder:
    """The target's text, faster: draft (a GPT over the same vocabulary) proposes k tokens a round.
    Both in eval mode. proposed and accepted count the latest generation's guesses and the kept ones."""

    def __init__(self, target, draft, k=4):
        if k < 1:
            raise ValueError(f"k={k}: the draft must propose at least 1 token a round")
        self.target, self.draft, self.k = target, draft, k
        self.proposed = self.accepted = 0
        self.decoders = None  # (target's, draft's) decode.Decoder once compiled

    def compile(self, device_type):
        """Run both models' steps compiled (decode.py): the target's (k + 1)-token chunk, the draft's reads
        of 1 and 2 tokens. A round at the end of a context, with fewer guesses, and a prefill run eagerly."""
        self.decoders = (Decoder(self.target, device_type, lengths=(self.k + 1,)),
                         Decoder(self.draft, device_type, lengths=(1, 2)))

    def caches(self, B, tokens):
        """(target's, draft's) KVCache for B rows of `tokens` tokens (prompt and new): static ones of a
        compiled shape once compiled. A round reads k + 1 positions past a row's tokens."""
        models, n = (self.target, self.draft), tokens + self.k + 1
        if self.decoders:
            return [d.cache(B, min(m.config.block_size, n)) for m, d in zip(models, self.decoders)]
        return [KVCache(m.config.n_layer, B, min(m.config.block_size, n)) for m in models]

    def warm_up(self, B, tokens):
        """Compile both models' steps now, for generate_stream on B rows of `tokens` tokens (prompt and
        new), before the generation that is timed. Returns the seconds it took."""
        return sum(d.warm_up(c, [B]) for d, c in zip(self.decoders, self.caches(B, tokens)))

    @property
    def acceptance(self):
        """The fraction of guesses the target kept."""
        return self.accepted / max(self.proposed, 1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None):
        """Continue idx (B, T) as decode.generate_stream would with the target alone, in distribution (greedy:
        token for token). Yields, each round, a list of B 1-D CPU tensors: the tokens each row gained (none
        once a row has max_new_tokens, or has emitted eos_token, its last token then)."""
        if problem := sampling_problem(temperature, top_k, top_p):  # the check decode.generate_stream makes
            raise ValueError(problem[1])
        target, draft = self.target, self.draft
        B, T = idx.shape
        dev, bs_t, bs_d = idx.device, target.config.block_size, draft.config.block_size
        room = lambda n: min(self.k, bs_t - n, bs_d + 1 - n)  # noqa: E731  guesses that fit both contexts
        cols = lambda start, m: (start[:, None] + torch.arange(m)).to(dev)  # noqa: E731  (B, m) positions
        self.proposed = self.accepted = 0
        # a finished row is still fed (the batch stays whole) but no longer grows: n <= T + max_new_tokens,
        # and a round reads k + 1 positions past it
        seq = idx.new_zeros(B, T + max_new_tokens + self.k + 1)  # row b's tokens: seq[b, :n[b]]
        seq[:, :T] = idx
        n, made = torch.full((B,), T), torch.zeros(B, dtype=torch.long)  # on the CPU, as KVCache.pos
        live = made < max_new_tokens
        # each cache's lengths, kept on the CPU too: a static cache's are on the model's device
        tcache, dcache = self.caches(B, T + max_new_tokens)
        tn, dn = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)

        def run(i, x, cache, n):  # model i (0: target, 1: draft) reads x (B, m) after the n (B,) it cached
            model, decoder = (target, draft)[i], self.decoders[i] if self.decoders else None
            h = decoder(x, cache, int(n.max())) if decoder else model.hidden_states(x, cache)
            n += x.size(1)
            return h  # (B, m, C)
        if T > 1 and room(T) >= 1:  # both cache all but the last prompt token
            run(0, idx[:, :-1], tcache, tn)
            run(1, idx[:, :-1], dcache, dn)
        while bool(live.any()) and (k := room(int(n.max()))) >= 1:
            # the draft reads the 1 or 2 tokens it has not seen (a row with fewer re-reads its last
            # cached one, so that all read m), then guesses k, each from q_i
            m = int((n - dn).max())
            dn = n - m
            dcache.pos[:] = dn
            x, q, guesses = seq.gather(1, cols(n - m, m)), [], []
            for _ in range(k):
                logits = draft.head(run(1, x, dcache, dn)[:, -1])  # (B, V)
                q.append(probs(logits, temperature, top_k, top_p))
                x = torch.multinomial(q[-1], 1)  # (B, 1)
                guesses.append(x)
            q, guesses = torch.stack(q, 1), torch.cat(guesses, 1)  # (B, k, V), (B, k)
            # the target scores the last token and the k guesses in one forward: p[:, i] is its
            # distribution for the token after seq[:n] + guesses[:i]
            chunk = torch.cat((seq.gather(1, cols(n - 1, 1)), guesses), 1)  # (B, k + 1)
            logits = target.head(run(0, chunk, tcache, tn))  # (B, k + 1, V)
            p = torch.stack([probs(logits[:, i], temperature, top_k, top_p) for i in range(k + 1)], 1)
            # accept guess i with probability min(1, p_i / q_i): u < p/q, written u * q < p
            pg, qg = (t.gather(2, guesses[..., None])[..., 0] for t in (p[:, :k], q))  # (B, k) each
            ok = torch.rand(B, k, device=dev) * qg < pg
            accepted = ok.long().cumprod(1).sum(1)  # (B,) the guesses before the first rejection
            # then one token from norm(max(0, p - q)) at the first rejection; past all k, q is 0
            # there, so the residual is p_{k+1}: the bonus token
            rows = torch.arange(B, device=dev)
            resid = (p - F.pad(q, (0, 0, 0, 1))).clamp(min=0)[rows, accepted]  # (B, V)
            # rounding can leave no residual mass when p and q (nearly) coincide: then p itself
            resid = torch.where(resid.sum(1, keepdim=True) > 0, resid, p[rows, accepted])
            extra = torch.multinomial(resid, 1)  # (B, 1); multinomial normalises
            new = torch.cat((guesses, extra), 1).scatter(1, accepted[:, None], extra)  # (B, k + 1)
            new, accepted = new.cpu(), accepted.cpu()
            # each live row keeps its accepted guesses and the extra token, cut at max_new_tokens and
            # just after its first eos_token
            self.proposed += k * int(live.sum())
            self.accepted += int(accepted[live].sum())
            take = torch.minimum(accepted + 1, max_new_tokens - made) * live
            if eos_token is not None:
                eos = (new == eos_token) & (torch.arange(k + 1) < take[:, None])
                take = torch.where(eos.any(1), eos.int().argmax(1) + 1, take)
                live &= ~eos.any(1)
            seq.scatter_(1, cols(n, k + 1), new.to(dev))  # past n + take: overwritten later
            # roll back: the target keeps what it read of the kept tokens (all but the newest); the
            # draft too, except the extra token (it read a guess there) and the last guess (never read)
            tn, dn = n + take - 1, torch.minimum(n + accepted.clamp(max=k - 1), n + take - 1)
            tcache.pos[:], dcache.pos[:] = tn, dn
            n, made = n + take, made + take
            live &= made < max_new_tokens
            yield [new[b, :take[b]] for b in range(B)]
        # past the shorter context: the target alone, as generate_stream re-reads its sliding window
        rest = [generate_stream(target, seq[b:b + 1, :int(n[b])], int(max_new_tokens - made[b]), temperature, top_k,
                                top_p, eos_token) if live[b] else iter(()) for b in range(B)]
        empty = torch.zeros(0, dtype=torch.long)
        for step in itertools.zip_longest(*rest):
            yield [empty if t is None else t[0].cpu() for t in step]

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None):
        """idx (B, T) -> (B, T + n) as decode.generate with the target alone: a row that stopped at
        eos_token is padded with it."""
        rows = [[torch.zeros(0, dtype=torch.long)] for _ in range(len(idx))]
        for new in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token):
            for row, tokens in zip(rows, new):
                row.append(tokens)
        rows = [torch.cat(row) for row in rows]
        out = torch.full((len(rows), max(map(len, rows))), 0 if eos_token is None else eos_token)
        for b, row in enumerate(rows):
            out[b, :len(row)] = row
        return torch.cat((idx, out.to(idx.device)), 1)

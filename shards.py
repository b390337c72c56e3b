"""
shards.py: the token shard format, and the stream of training rows that train.py reads from shards.

The format is llm.c's (data/fineweb.py writes it, train_gpt2.c reads it), so the two are
interchangeable: a header of 256 little-endian int32, of which the first three are the magic number
20240520, the version 1 and the token count; then the tokens as little-endian uint16. uint16 makes a
token 2 bytes on disk and in the page cache, and caps a vocabulary at 65,536 ids (GPT-2's 50,257 fits).
prepare.py writes shards; the reader checks magic, version and that the file size matches the count,
so a truncated or foreign file is an error naming it, never silently wrong tokens.

TokenStream is how train.py reads them; its docstring explains the order and why.
"""
import os

import numpy as np

from atomic import atomic_write

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256  # llm.c's header
HEADER_BYTES = 4 * HEADER_INTS
MAX_VOCAB = 1 << 16  # uint16 token ids: 0 .. 65535


def write_shard(path, tokens):
    """Write tokens (ints < 65536) to path as header + uint16, atomically."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
            raise ValueError(f"{path}: token ids must be in 0..65535 to fit uint16 shards")
        tokens = tokens.astype(np.uint16)
    if len(tokens) >= 1 << 31:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 count of the header")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)

    def write(f):
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype="<u2").data)  # no copy for a buffer slice (little-endian)
    atomic_write(path, write)


def read_shard(path):
    """The tokens of a shard as a read-only uint16 memmap (no copy: shards can be GBs), after checking
    magic, version and that the file size matches the token count. ValueError names the file."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ValueError(f"shard {path}: {e.strerror}") from None
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path}: truncated: {size} bytes, smaller than the {HEADER_BYTES}-byte "
                         f"header; re-run prepare.py")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"shard {path}: wrong magic number {header[0]} (expected {MAGIC}): not a "
                         f"token shard, or corrupt; re-run prepare.py")
    if header[1] != VERSION:
        raise ValueError(f"shard {path}: unsupported version {header[1]} (expected {VERSION})")
    ntok = int(header[2])
    if ntok < 0 or size != HEADER_BYTES + 2 * ntok:
        raise ValueError(f"shard {path}: {size} bytes but the header says {ntok} tokens "
                         f"({HEADER_BYTES + 2 * ntok} bytes): truncated or corrupt; re-run prepare.py")
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)  # mmap cannot map zero bytes
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


class TokenStream:
    """The shards `files` as one endless token stream, cut into rows of T inputs (and the T targets,
    shifted by one).

    A row also reads the token after it as its last target (the next row's first input), so every
    token is an input exactly once per pass; a row that straddles two shards is stitched from both,
    and nothing is dropped or repeated. An epoch is the next total_tokens // T rows (the leftover < T
    tokens start the next epoch instead of being dropped). With a seed, an epoch's rows are read in a
    random order seeded by (seed, epoch), so a batch mixes the whole corpus, not one region of it
    (the README measures what reading in file order costs). Rows are numbered in the order they are
    read; rank r of W reads micro-batches r, r+W, ... of B rows each, so W ranks read exactly the rows
    one process would. self.pos, the rows read so far by all ranks, is the data position a
    checkpoint saves."""

    def __init__(self, files, B, T, rank=0, world=1, device="cpu", seed=None):
        self.shards = [read_shard(f) for f in files]  # np.memmap uint16: pages are read on demand
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # offset of each shard's 1st token
        self.total = int(self.starts[-1])  # tokens in the stream, before it wraps around
        if self.total < B * T + 1:
            raise ValueError(f"{files[0]}...: {self.total} tokens, fewer than one batch of "
                             f"{B}x{T}+1; lower batch_size or block_size, or prepare more data")
        self.rows = self.total // T  # rows per epoch; epoch e covers rows e*rows .. (e+1)*rows - 1
        self.B, self.T, self.rank, self.world, self.device, self.seed = B, T, rank, world, device, seed
        self.pos, self.order = 0, (None, None)  # (epoch, its permutation), computed once per epoch

    def read(self, start, n):
        """n tokens from stream position start, stitched across shard ends and the wrap-around."""
        out = np.empty(n, dtype=np.int64)  # int64: what embedding lookups and cross_entropy take
        done, start = 0, start % self.total
        while done < n:
            i = int(np.searchsorted(self.starts, start, side="right")) - 1  # shard holding `start`
            off = start - int(self.starts[i])
            take = min(n - done, len(self.shards[i]) - off)
            out[done:done + take] = self.shards[i][off:off + take]
            done, start = done + take, (start + take) % self.total
        return out

    def row_start(self, r):
        """Stream position of the first input token of the r-th row read."""
        epoch, j = divmod(r, self.rows)
        if self.seed is not None:
            if self.order[0] != epoch:  # the same permutation on every rank and after a resume
                self.order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.rows))
            j = int(self.order[1][j])
        return (epoch * self.rows + j) * self.T

    def batch(self, starts):
        """Rows at stream positions `starts` -> inputs x and targets y, each (B, T) on the device."""
        import torch  # here, not at the top: prepare.py imports this module and never needs torch
        buf = torch.from_numpy(np.stack([self.read(p, self.T + 1) for p in starts]))  # (B, T+1)
        if self.device.startswith("cuda"):
            # page-locked memory lets the copy run asynchronously, overlapping the GPU's compute
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)  # the CPU: no copy; MPS: a plain copy
        return buf[:, :-1], buf[:, 1:]  # one copy, two views

    def next_batch(self):
        """This rank's next training micro-batch; advances the position of all ranks."""
        first = self.pos + self.rank * self.B
        self.pos += self.world * self.B
        return self.batch([self.row_start(r) for r in range(first, first + self.B)])

    def eval_batch(self, k, n_batches):
        """The k-th of n_batches fixed evaluation batches: rows spread evenly over the whole stream (in
        file order, whatever the training position), so an evaluation sees every region of the data,
        and every evaluation sees the same rows, so they compare."""
        n = n_batches * self.B
        rows = [(k * self.B + b) * self.rows // n for b in range(self.B)] if n <= self.rows else \
            [(k * self.B + b) % self.rows for b in range(self.B)]  # fewer rows than asked: wrap around
        return self.batch([r * self.T for r in rows])

    def state(self):
        return {"epoch": self.pos // self.rows, "row": self.pos % self.rows, "rows_per_epoch": self.rows}

    def load_state(self, s):
        """Continue from a checkpoint's position. False if the shards changed since (then the stream
        starts from the beginning)."""
        if s["rows_per_epoch"] != self.rows:
            return False
        self.pos = s["epoch"] * self.rows + s["row"]
        return True

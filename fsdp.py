"""
fsdp.py: FSDP2 (fully_shard) for train.py --parallel=fsdp: the model built on the meta device with
each rank initialising only its own slices (ShardedInit), and shard(), which wraps each block and
puts the weights in place. Checkpoints stay in the one full format (train.py gathers them on rank 0).
"""
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

from model import rope_tables


class ShardedInit(TorchDispatchMode):
    """FSDP: build the model on the meta device, where a tensor is only a shape, so that no rank ever
    holds the whole model (eight ranks would each build it on the host). Its initialisation is
    replayed on the CPU, one tensor at a time: each in-place fill of a meta tensor (model.py's
    normal_, nn.Linear's uniform_, zero_, fill_) runs on a CPU tensor of that shape, drawing from the
    seeded CPU generator in the same order as a CPU build, and this rank keeps its slice along dim 0
    (FSDP2's shard). So the weights equal a CPU build's for the same seed, at one tensor of peak memory.
        with torch.device("meta"), ShardedInit(rank, world) as init:
            model = GPT(config)"""
    FILLS = ("aten::normal_", "aten::uniform_", "aten::zero_", "aten::fill_")  # they overwrite every element

    def __init__(self, rank, world):
        super().__init__()
        self.rank, self.world, self.slices = rank, world, {}  # id(tensor) -> (tensor, its slice or None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = args[0] if args else None
        if isinstance(t, torch.Tensor) and t.is_meta and func._schema.is_mutable:
            full = None
            if func._schema.name in self.FILLS:  # any other in-place op reads the tensor: not replayable
                full = torch.empty(t.shape, dtype=t.dtype)
                func(full, *args[1:], **(kwargs or {}))
            self.slices[id(t)] = (t, None if full is None else local_slice(full, self.rank, self.world))
        return func(*args, **(kwargs or {}))

    def weights(self, model):
        """{parameter name: this rank's slice} for the model built under this mode."""
        out = {}
        for name, p in model.named_parameters():
            if self.slices.get(id(p), (None, None))[1] is None:
                raise ValueError(f"{name} was not initialised by a fill that the meta build can replay")
            out[name] = self.slices[id(p)][1]
        return out


def local_slice(full, rank, world):
    """Rank's part of a full tensor as FSDP2 shards it: torch.chunk along dim 0 (the last ranks may get
    less, or nothing)."""
    chunks = full.chunk(world)
    return chunks[rank].clone() if rank < len(chunks) else full[:0].clone()


def shard(model, weights, dev, ptdtype, rank, world):
    """FSDP2: each block, then the rest, becomes one unit whose parameters are sharded across the
    ranks (DTensors) and gathered for its forward and backward only: per GPU, weights, gradients and
    AdamW's two moments cost 1/world of the full model. A model built on the meta device is then
    allocated on dev, its shards filled from `weights` ({name: this rank's slice} from ShardedInit, or
    a full state dict, e.g. a memory-mapped checkpoint's, from which each rank reads its slice) and its
    RoPE tables, which are derived rather than saved, recomputed. In bfloat16 the weights are
    gathered and the blocks compute in bf16 while the gradients are reduce-scattered and kept in
    float32 (torchtitan's policy): half the traffic of a float32 all-gather, none of the lost precision
    in the sums. float32 runs keep float32 throughout."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if ptdtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if weights is None:  # already on the CPU with its weights (GPT-2's): only the shards move to dev
        return model.to(dev)
    model.to_empty(device=dev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = weights[name]
            if part.shape != p.to_local().shape:  # a full tensor: take this rank's slice
                part = local_slice(part, rank, world)
            p.to_local().copy_(part)
        if model.config.pos == "rope":
            for buf, table in zip((model.rope_cos, model.rope_sin), rope_tables(model.config)):
                buf.copy_(table)
    return model

# GPT-1 (117M): the pre-training recipe of Radford et al. 2018, "Improving Language Understanding by
# Generative Pre-Training", section 4.1 "Model specifications", on the data we can get.
#
# Data: the paper trained on BooksCorpus (~7,000 unpublished books), which is not publicly
# available; we use FineWeb-Edu (sample-10BT) instead, tokenized with our own byte-level BPE of
# 40,000 merges (the paper's BPE also had 40,000 merges, over characters rather than bytes):
#   python prepare.py --dataset=fineweb_edu --tokenizer=train --vocab_size=40257 --name=fineweb_edu_bpe40k
# (256 byte tokens + 40,000 merges + <|endoftext|> = 40,257.) Then, on 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt1_117m.py --batch_size=8 --gradient_accumulation_steps=8
dataset = "fineweb_edu_bpe40k"
out_dir = "out-gpt1"
eval_interval = 1000
eval_iters = 50
log_interval = 50

# model: 12 decoder layers, 768 wide, 12 heads, MLP 3072, learned positions, GELU, post-LayerNorm
preset = "gpt1"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 512                  # "contiguous sequences of 512 tokens"
dropout = 0.1                     # "residual, embedding, and attention dropouts with a rate of 0.1"

# "minibatches of 64 randomly sampled, contiguous sequences of 512 tokens": 32,768 tokens per step
batch_size = 16
gradient_accumulation_steps = 4   # 16 x 4 = 64 sequences (8 GPUs: --batch_size=8 --gradient_accumulation_steps=8)

# "Adam ... max learning rate of 2.5e-4 ... increased linearly from zero over the first 2000 updates
# and annealed to 0 using a cosine schedule"
learning_rate = 2.5e-4
warmup_iters = 2000
min_lr = 0.0
# The paper trained "for 100 epochs" of BooksCorpus. Here the default is one pass over FineWeb-Edu's
# 10B tokens, 10e9 / 32,768 = ~305,000 steps; raise it to train longer (the data stream wraps around).
max_iters = 305_000
# "a modified version of L2 regularization proposed in [37] (Loshchilov & Hutter: decoupled weight
# decay, i.e. AdamW), with w = 0.01 on all non bias or gain weights"
weight_decay = 0.01
# The paper gives no Adam betas/epsilon; these are Adam's defaults (Kingma & Ba 2015), which OpenAI's
# released GPT-1 code (finetune-transformer-lm) also uses.
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
grad_clip = 1.0                   # not in the paper; a safety net that rarely engages at this lr

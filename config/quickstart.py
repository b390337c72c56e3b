# Quick start: a small GPT on the Python standard library (prepare.py --dataset=stdlib: offline, a
# 4,096-token BPE, ~3M train tokens), sized for a 2-core laptop CPU: 4-7 minutes of training,
# then `python sample.py --out_dir=out-quickstart` prints recognisable Python.
#   python prepare.py --dataset=stdlib && python train.py config/quickstart.py
# Budget (2 cores, float32, eager; README, Measured): 0.17-0.35 s per 2,048-token step, so 1,200
# steps = 4-7 minutes = 2.5M tokens, about 0.8 epoch; val 1.69 bits per byte at the end (1.77 at
# step 800) over rows spread across the val split. On ~1 MB of prose this config passes nanoGPT's CPU baby GPT (2.10 bits/byte after 128 s) in
# 150 steps and 40 s (bench/bench_quickstart.py). A faster machine: raise max_iters.
dataset = "stdlib"
out_dir = "out-quickstart"
init_from = "auto"                # a second run of the quick start resumes (or says it is finished)
eval_interval = 200
eval_iters = 20
log_interval = 20

# the model: Llama-style blocks (RMSNorm, rotary positions, SwiGLU), 4 layers 128 wide: 1.4M
# parameters, of which the 4,096 x 128 embedding (tied with the output layer) is 0.5M
preset = "modern"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0                     # under one epoch: no data is seen twice, nothing to regularise

batch_size = 16
gradient_accumulation_steps = 1   # 2,048 tokens per step
learning_rate = 2e-3              # small models take large steps (nanoGPT's baby GPT: 1e-3)
max_iters = 1200
warmup_iters = 50
min_lr = 2e-4                     # learning_rate / 10
beta2 = 0.99                      # few tokens per step: average the second moment longer (as baby GPT)

device = "cpu"
dtype = "float32"                 # bfloat16 autocast only pays on CPUs with AMX/AVX512-BF16
compile = False                   # measured slower on 2 cores for this size (README, Measured)

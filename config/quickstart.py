# Quick start: a small GPT on the Python standard library (prepare.py --dataset=stdlib: offline, a
# 4,096-token BPE, ~3M train tokens), sized for a 2-core laptop CPU: about 4 minutes of training,
# then `python sample.py --model=out-quickstart` prints recognisable Python.
#   python prepare.py --dataset=stdlib && python train.py config/quickstart.py
# 2,400 steps of 1,024 tokens = 2.5M tokens, 0.8 epoch. Its time, its val bits per byte, and its race
# against nanoGPT's CPU baby GPT are in bench/README.md (bench/bench_quickstart.py). A faster machine:
# raise max_iters.
dataset = "stdlib"
out_dir = "out-quickstart"
init_from = "auto"                # a second run of the quick start resumes (or says it is finished)
eval_interval = 400
eval_iters = 20
log_interval = 40

# the model: Llama-style blocks (RMSNorm, rotary positions, SwiGLU), 4 layers 128 wide: 1.4M
# parameters in the blocks and the 4,096 x 128 output layer, plus a 0.5M input embedding (a lookup)
preset = "modern"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0                     # under one epoch: no data is seen twice, nothing to regularise
# an untied head, so the input embedding can take its own 50x learning rate (training.configure_optimizers),
# which did best of tied, untied and untied at 50x (bench/README.md)
tie_weights = False
embedding_lr_scale = 50.0

# 1,024 tokens per step: on 2 cores a step's time is proportional to its tokens, so a smaller batch buys
# more updates for the same time, and early in training updates matter more than their precision.
# At equal tokens on stdlib, batch 8 x 2,400 steps did best of 16 x 1,200, 8 x 2,400 and 4 x 4,800 (bench/README.md).
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 2e-3              # small models take large steps (nanoGPT's baby GPT: 1e-3)
max_iters = 2400
warmup_iters = 20                 # short: a 4-layer pre-norm model is stable from the start
min_lr = 2e-4                     # learning_rate / 10
beta2 = 0.99                      # few tokens per step: average the second moment longer (as baby GPT)

device = "cpu"
dtype = "float32"                 # bfloat16 autocast only pays on CPUs with AMX/AVX512-BF16
compile = False                   # measured slower on 2 cores for this size (bench/README.md)

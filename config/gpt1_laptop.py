# GPT-1 on a laptop: the recipe of config/gpt1_117m.py (post-LayerNorm blocks, learned positions, GELU,
# a tied head, Adam with warmup and cosine decay, books as the corpus) scaled to 51 minutes on 2 CPU cores.
# The corpus: 243 English Project Gutenberg books, 100 MB (bench/gpt1_data.py fetches and pins them;
# bench/README.md names the repository, commit and licence), with our own 8,192-token BPE:
#   python prepare.py --input='corpus/*.txt' --name=gutenberg --tokenizer=train --vocab_size=8192 --bpe_train_mb=40 \
#       --license_id='public domain in the USA; rcdm-uga/Gutenberg_Text@a0b16d35'
#   python train.py config/gpt1_laptop.py
# 23.9M train tokens; this run reads 6M of them (a quarter of an epoch) in 2,900 steps. Its time, the
# sizes tried, a sample and the fine-tuning results (bench/bench_gpt1.py) are in bench/README.md.
dataset = "gutenberg"
out_dir = "out-gpt1-laptop"
init_from = "auto"                # a second run resumes (or says it is finished)
eval_interval = 250               # each evaluation keeps a checkpoint: the zero-shot curve reads them all
eval_iters = 10
log_interval = 50
keep_last = 100                   # keep every step checkpoint (13 of 83 MB), not only the last 2

# the model: GPT-1's blocks at 6 layers x 256 (4.7M parameters in the blocks, 2.1M in the tied
# 8,192 x 256 embedding); 4 x 256 and 6 x 192 ran 15-35% more tokens per second, which a quarter epoch
# does not need as much as depth (the layers-transferred curve wants several layers)
preset = "gpt1"
n_layer = 6
n_head = 4
n_embd = 256
block_size = 256
dropout = 0.0                     # under one epoch: no token is seen twice

# 8 x 256 = 2,048 tokens per step: on 2 cores a step's time is proportional to its tokens, so a small
# batch buys more updates in the same minutes (config/quickstart.py measured the same on stdlib)
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 8e-4              # GPT-1's 2.5e-4 is for 117M parameters; small models take larger steps
max_iters = 2900
warmup_iters = 200                # post-LN needs its warmup (GPT-1: 2,000 of its 100 epochs)
min_lr = 8e-5
beta2 = 0.99                      # few tokens per step: average the second moment longer
weight_decay = 0.01               # GPT-1's w

device = "cpu"
dtype = "float32"                 # bfloat16 autocast only pays on CPUs with AMX/AVX512-BF16
compile = False                   # a 40-step trial ran at 880 tokens/s compiled (compile included) vs 2,260 eager

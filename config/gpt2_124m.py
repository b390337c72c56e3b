# GPT-2 small (124M) on FineWeb-Edu, 10B tokens: the settings known to reach (and pass) OpenAI's GPT-2
# 124M on HellaSwag with one pass over the data. Sources:
#   [nano] Karpathy, build-nanogpt, train_gpt2.py ("Let's reproduce GPT-2 (124M)"), FineWeb-Edu sample-10BT
#   [llmc] Karpathy, llm.c discussion #481 "Reproducing GPT-2 (124M) in llm.c in 90 minutes for $20"
#   [gpt3] Brown et al. 2020, Table 2.1 (GPT-3 Small, the same shape: lr 6e-4, batch 0.5M tokens)
#   python prepare.py --dataset=fineweb_edu          # GPT-2 tokenizer, ~10B tokens in 100M-token shards
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
dataset = "fineweb_edu"
out_dir = "out-gpt2-124m"
eval_interval = 250               # [llmc] -v 250
eval_iters = 20                   # 20 batches of 32 x 1024 = 655k val tokens
log_interval = 10

preset = "gpt2"                   # 12 layers, 12 heads, 768 wide, context 1024, GPT-2 tokenizer
dropout = 0.0                     # one pass over 10B tokens never repeats data: nothing to regularise

# 2**19 = 524,288 tokens per step [nano][llmc][gpt3]: 32 sequences x 1024 x 16 micro-batches.
# A GPU with less memory: halve batch_size and double gradient_accumulation_steps (same global batch).
batch_size = 32
gradient_accumulation_steps = 16  # global: on 8 GPUs each does 2
max_iters = 19_073                # 10e9 / 524,288: one epoch of the 10B tokens [nano][llmc]
learning_rate = 6e-4              # [nano][llmc][gpt3]
warmup_iters = 715                # [nano] (715; [llmc] uses 700)
min_lr = 6e-5                     # 10% of the peak [nano]; [llmc] decays to 0, with the same result
weight_decay = 0.1                # [nano][llmc][gpt3]
beta1 = 0.9
beta2 = 0.95                      # [nano][gpt3]
eps = 1e-8
grad_clip = 1.0                   # [nano][gpt3]

dtype = "bfloat16"
compile = True

# GPT-1's supervised fine-tuning (Radford et al. 2018, "Improving Language Understanding by Generative
# Pre-Training"), §3.2 and §4.1 "Fine-tuning details". Pick the model, data and task on the command line:
#   python finetune.py config/finetune_gpt1.py --model=gpt2 --data=nyu-mll/glue --data_config=sst2
#   python finetune.py config/finetune_gpt1.py --model=gpt2 --data=nyu-mll/glue --data_config=rte \
#       --task=entailment --text_fields=sentence1,sentence2
#   python finetune.py config/finetune_gpt1.py --model=gpt2 --data=nyu-mll/glue --data_config=stsb \
#       --task=similarity --text_fields=sentence1,sentence2 --regression=True
out_dir = "out-finetune-gpt1"

# "For most tasks, we use a learning rate of 6.25e-5 and a batchsize of 32. Our model finetunes quickly
# and 3 epochs of training was sufficient for most cases. We use a linear learning rate decay schedule
# with warmup over 0.2% of training."
learning_rate = 6.25e-5
batch_size = 32
epochs = 3
warmup_frac = 0.002             # then linear decay to 0
# "We add dropout to the classifier with a rate of 0.1."
head_dropout = 0.1
# "Unless specified, we reuse the hyperparameter settings from unsupervised pre-training": residual,
# embedding and attention dropout 0.1; decoupled weight decay w = 0.01 on all non bias or gain weights;
# Adam (the released code's defaults: betas 0.9, 0.999; gradient norm clipped at 1)
dropout = 0.1
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
# "λ was set to 0.5": L3(C) = L2(C) + λ * L1(C), the task loss plus the language-modelling loss (§3.2)
lm_coef = 0.5
# The paper trained every weight; --lora_rank=8 trains adapters instead (Hu et al. 2021), and then
# wants a larger learning rate (Hu et al. used 2e-4 for GPT-2 medium on E2E).
lora_rank = 0

"""Names that the config, the command line and the code all spell: evaluation tasks, decoding strategies,
precisions and the noise mixture's options.

Defined once here, free of torch, timm and transformers, so that config.py and the argument parsers can import
them cheaply. The code that implements each name imports it from here too: eval/tasks.py checks that its task
table covers EVAL_TASKS, model/generation.py validates a strategy against STRATEGIES.
"""
from __future__ import annotations

EVAL_TASKS = {
    "zeroshot": "zero-shot classification: top-1/top-5 against class prompts",
    "retrieval": "image-text retrieval: recall@1/5/10 both ways over every caption of an image",
    "caption": "generated captions scored against the references (BLEU, METEOR, ROUGE-L, CIDEr)",
    "linear_probe": "logistic regression on frozen image features of labelled training images",
}

STRATEGIES = {
    "greedy": "the most likely token at every step",
    "nucleus": "sampling from the smallest set of tokens whose probability reaches top_p",
    "beam": "beam search with length normalization",
}

# Evaluation decodes deterministically: the same captions on one process or many, and in every rerun.
EVAL_STRATEGIES = ("greedy", "beam")

# Weight and activation dtypes: train.precision and the --precision of eval, caption and audit (fp16 needs GPUs).
PRECISIONS = ("fp32", "bf16", "fp16")

# The noise mixture (noise/gmm.py): where EM's first hard split lies, and how a fit turns into ε per pair.
GMM_INITS = ("midrange", "median")
GMM_EPSILONS = ("posterior", "rank")

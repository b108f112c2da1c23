"""Build the default model locally (no model hub here): a tokenizer trained with `tokenizers` on
the claims' vocabulary and a small Llama-architecture model with random weights from a fixed seed,
both saved with save_pretrained so the template loads them like any real model."""

import time

import torch
from claimio import LABELS, evidence_text, read_claims
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

started = time.perf_counter()
size = dict(snakemake.params.size)
out = snakemake.output[0]

claims = read_claims(snakemake.input[0])
texts = [f"Evidence: {evidence_text(c.get('evidence'))}\nClaim: {c['claim']}\nVerdict:" for c in claims]
texts += [f"Verdict: {label}" for label in LABELS]

tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=int(size["vocab_size"]),
    special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tokenizer.train_from_iterator(texts, trainer)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
)

torch.manual_seed(snakemake.params.seed)
config = LlamaConfig(
    vocab_size=len(fast),
    hidden_size=int(size["hidden_size"]),
    intermediate_size=int(size["intermediate_size"]),
    num_hidden_layers=int(size["layers"]),
    num_attention_heads=int(size["heads"]),
    num_key_value_heads=int(size["heads"]),
    max_position_embeddings=512,
    bos_token_id=fast.bos_token_id,
    eos_token_id=fast.eos_token_id,
    pad_token_id=fast.pad_token_id,
)
model = LlamaForCausalLM(config)
model.save_pretrained(out, safe_serialization=True)
fast.save_pretrained(out)

with open(snakemake.log[0], "w") as log:
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"built {out}: Llama, {parameters:,} parameters (random, seed {snakemake.params.seed}), "
        f"tokenizer of {len(fast)} tokens from {len(claims)} claims, in {time.perf_counter() - started:.1f} s",
        file=log,
    )

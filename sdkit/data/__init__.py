"""Data sdkit ships so that a single-file Stable Diffusion model loads with no network:
CLIP's BPE merges (`bpe_simple_vocab_16e6.txt.gz`, OpenAI CLIP, MIT: see
`CLIP-LICENSE.txt`) and the tokenizers built from them (`clip_tokenizer`), and the
scheduler and tokenizer settings of each family's released pipeline (`pipeline_defaults`).
"""

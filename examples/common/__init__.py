"""Shared pieces of the example scripts: a byte-level tokenizer, a generated
corpus, GPT and BERT datasets, and a loader that shards batches by rank."""

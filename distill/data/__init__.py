"""The data stage: download the challenge's cached shards, train a tokenizer, build curated shards.

Modules: sources (read documents from JSONL / Parquet / text / an HF dataset), filters (normalisation,
exact + near-duplicate removal, quality heuristics), build (curate -> tokenize -> shards + manifest),
download (the challenge's shards from the Hugging Face hub), cli (`distill data ...`).
"""

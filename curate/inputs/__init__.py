"""Input readers: URL lists (parquet, csv, tsv, jsonl, txt) and existing WebDataset shards become uid-tagged input
chunks staged in the run's folder."""

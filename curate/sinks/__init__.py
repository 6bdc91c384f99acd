"""Output writers: WebDataset shards of the kept rows (with a parquet index each) and the pair tars the trainer and
the bootstrapped scorer read."""

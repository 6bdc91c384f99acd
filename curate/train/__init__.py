"""`curate train` and `curate eval`: open_clip models trained and evaluated on curated WebDataset shards."""

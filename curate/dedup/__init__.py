"""The algorithms the dedup stages call: fingerprints of what an image draws, near-duplicate search over hash bands
with its verification, exact-digest groups and the keep policy, and semantic clusters of embeddings."""

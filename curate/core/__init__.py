"""The spine: the two stage contracts, the worker that runs a per-sample stage, the runner, the parts store and
the pool over it, the decide phase, the ledger and manifest, and the atomic-write helper."""

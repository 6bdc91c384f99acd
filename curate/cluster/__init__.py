"""Connecting to Ray (embedded, an address, or a cluster with token auth) and the Ray Jobs client behind
`curate submit`, `jobs`, `logs` and `stop`."""

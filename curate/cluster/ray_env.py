"""Connecting to Ray (embedded or an existing cluster) and sizing worker pools from what the cluster has."""

from __future__ import annotations

import logging
import os
import sys

from curate.config import RayConfig
from curate.errors import CurateError
from curate.config import Resources

# CPUs left free for the driver (Ray Data's scheduler) and any light tasks, so a pool of actors cannot starve them.
RESERVED_CPUS = 0.5


def ensure_ray(config: RayConfig, progress_bars: bool = False) -> None:
    """Start an embedded Ray sized to this machine, or connect to ``config.address``; reuse one already running.
    ``progress_bars``: Ray Data's per-operator bars (for a terminal; in logs they would interleave with curate's
    lines)."""
    import ray

    if ray.is_initialized():
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = progress_bars
        return
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE") if k in os.environ}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # a submitted job: its runtime env (curate submit) has them
        env = {}
    try:
        if config.address:
            check_cluster_address(config.address)
            ray.init(address=config.address, logging_level=logging.WARNING, runtime_env={"env_vars": env} if env else None)
        else:
            ray.init(
                num_cpus=config.num_cpus,  # None: Ray counts the CPUs this process may use (cgroup-aware)
                include_dashboard=False,
                logging_level=logging.WARNING,
                configure_logging=True,
            )
    except ConnectionError as err:
        raise CurateError(f"ray.address {config.address}: cannot connect ({err}); check the address, and that the "
                          "token (RAY_AUTH_TOKEN or ~/.ray/auth_token) is the cluster's") from None
    except Exception as err:
        if type(err).__name__ != "AuthenticationError":
            raise
        raise CurateError(f"ray.address {config.address}: {str(err).strip().splitlines()[0]}") from None
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = False


_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _warned:
        _warned.add(text)
        print(f"curate: warning: {text}", file=sys.stderr)


def check_cluster_address(address: str) -> None:
    """Joining an existing cluster: Ray Client (ray://) cannot run Ray Data pipelines, and a cluster is joined with
    the user's token (token auth on, unless RAY_AUTH_MODE=disabled is set explicitly). Called before a run writes
    anything, and again when joining."""
    if address.startswith("ray://"):
        raise CurateError(
            f"ray.address {address}: Ray Client (ray://) cannot run Ray Data pipelines; submit the pipeline as a job "
            "(curate submit PIPELINE --address http://HEAD:8265) or run on a cluster node with --address auto"
        )
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        _warn_once("RAY_AUTH_MODE=disabled: joining a cluster without token authentication")
        return
    from curate.cluster.jobs import auth_token

    auth_token()  # one clear line when there is none, before Ray's own retries
    os.environ["RAY_AUTH_MODE"] = "token"  # Ray sends the token only in token mode; the cluster checks it


def worker_cpus(resources: Resources) -> float:
    """CPUs to reserve per worker: as asked, but never so many that one worker leaves no room for the driver and
    light tasks on the largest node (a pipeline written for a big cluster still runs on a laptop)."""
    import ray

    largest = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")), default=1.0)
    return max(0.05, min(resources.cpus, largest - RESERVED_CPUS))


def pool_size(resources: Resources, stage: str = "a stage") -> int:
    """Actors a stage can have at once on this cluster, leaving room for the lightweight tasks around it; refuses
    GPUs or custom resources the cluster does not have (Ray would wait for them forever)."""
    import ray

    available = ray.cluster_resources()
    cpus = available.get("CPU", 1.0)
    size = max(1, int((cpus - RESERVED_CPUS) / worker_cpus(resources)))
    if resources.gpus:
        gpus = available.get("GPU", 0.0)
        if gpus < resources.gpus:
            raise CurateError(
                f"{stage} asks for {resources.gpus:g} GPU per worker but the cluster has {gpus:g} GPUs; "
                f"set {stage}.resources.gpus: 0 to run it on CPUs"
            )
        size = min(size, int(gpus / resources.gpus))
    for name, amount in resources.custom.items():
        have = available.get(name, 0.0)
        if have < amount:
            raise CurateError(f"{stage} asks for custom resource '{name}: {amount:g}' but the cluster has {have:g}")
        size = min(size, int(have / amount))
    return size

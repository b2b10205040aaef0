"""Which networks an experiment trains: ``matrix.seeds`` replicas of ``train.ensemble``
members, each with its seed, and the MLflow name that tells their runs apart."""

from __future__ import annotations

from dataclasses import dataclass

from deepopt.config import RunConfig
from deepopt.config.limits import MAX_REPLICAS

__all__ = ["Member", "member_run_name", "members_of"]


@dataclass(frozen=True)
class Member:
    replica: int  # which of matrix.seeds repetitions
    index: int  # which ensemble member within the replica
    seed: int


def members_of(config: RunConfig, replicas: int) -> list[Member]:
    """Replica r, member k trains with seed + r + MAX_REPLICAS * k.

    Replica r of every experiment then starts from seed + r (its member 0 for an
    ensemble): the same data order and, where the architectures match, the same initial
    weights, so experiments compare pairwise by replica. Members k >= 1 of an ensemble get
    seeds no replica of any experiment uses.
    """
    size = config.train.ensemble
    return [
        Member(replica=r, index=k, seed=config.seed + r + MAX_REPLICAS * k)
        for r in range(replicas)
        for k in range(size)
    ]


def member_run_name(experiment: str, member: Member, ensemble: int) -> str:
    """The MLflow run name of one member: the seed tells seed runs apart, the replica and
    member index an ensemble's networks."""
    if ensemble == 1:
        return f"{experiment} seed {member.seed}"
    return f"{experiment} replica {member.replica} member {member.index} (seed {member.seed})"

"""A Flower node's replica log: folding replayed rounds into a snapshot keeps the replica bit-exact."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from fedlora.aggregation import GlobalUpdate, LoraFactors
from fedlora.engine.client import LocalTrainer
from fedlora.lora.merge import base_weight
from fedlora.models import load_model
from fedlora.runtime.flower.client_app import SNAPSHOT_FILE, ReplicaLog
from fedlora.runtime.flower.wire import Catchup

Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def bf16_trainer() -> LocalTrainer:
    """A pristine bfloat16 tiny-llama: small merges leave a carry, which the replica must keep too."""
    model, _ = load_model("tiny-llama", dtype="bfloat16", device="cpu")
    return LocalTrainer(model, 0, target_modules=["q_proj", "v_proj"], batch_size=1)


SHAPES = {module: tuple(base_weight(load_model("tiny-llama", device="cpu")[0], module).shape) for module in (Q0, V1)}


def random_update(server_round: int, *, merge: bool) -> GlobalUpdate:
    """FLoRA-like (merge: the factors go into the base) or FedEx-like (only the residual does);
    tiny entries, so bfloat16 rounding drops most of each merge unless the carry keeps it."""
    generator = torch.Generator().manual_seed(server_round)

    def factors(module: str, rank: int) -> LoraFactors:
        d, n = SHAPES[module]
        return LoraFactors(1e-3 * torch.randn(rank, n, generator=generator),
                           1e-3 * torch.randn(d, rank, generator=generator), 0.5)
    return GlobalUpdate(factors={Q0: factors(Q0, 3), V1: factors(V1, 2)}, merge=merge,
                        residual={} if merge else {V1: factors(V1, 4)})


UPDATES = [(1, random_update(1, merge=True)), (2, random_update(2, merge=False)),
           (3, random_update(3, merge=True)), (4, random_update(4, merge=True))]


def directly_merged(through: int) -> LocalTrainer:
    trainer = bf16_trainer()
    for server_round, update in UPDATES[:through]:
        trainer.apply_base_update(update)
    return trainer


def replayed(log: ReplicaLog) -> LocalTrainer:
    trainer = bf16_trainer()
    log.replay(trainer)
    return trainer


def assert_same_replica(actual: LocalTrainer, expected: LocalTrainer) -> None:
    for module in (Q0, V1):
        assert torch.equal(base_weight(actual.model, module), base_weight(expected.model, module)), module
    assert actual.carry.keys() == expected.carry.keys() and actual.carry
    for module, carry in expected.carry.items():
        assert torch.equal(actual.carry[module], carry), module


def record(log: ReplicaLog, since: int, through: int) -> None:
    log.record(Catchup(since=since, through=through, updates=tuple(UPDATES[since:through])))


def test_replayed_rounds_fold_into_a_snapshot_and_the_replica_stays_bit_exact(tmp_path):
    log = ReplicaLog(tmp_path)
    record(log, 0, 2)
    assert_same_replica(replayed(log), directly_merged(2))
    assert log.rounds() == [] and log.snapshot_round() == 2  # the files of rounds 1-2 are gone

    record(log, 2, 4)
    assert log.rounds() == [3, 4]
    assert_same_replica(replayed(log), directly_merged(4))  # snapshot of 1-2, then 3 and 4
    assert log.rounds() == [] and log.snapshot_round() == 4
    assert_same_replica(replayed(log), directly_merged(4))  # the snapshot alone


def test_a_crash_between_snapshot_and_deleting_the_folded_rounds_merges_nothing_twice(tmp_path):
    log = ReplicaLog(tmp_path / "log")
    record(log, 0, 3)
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "log", kept)
    replayed(log)
    # The files as they were before the fold deleted them, beside the new snapshot.
    for path in kept.glob("round-*"):
        shutil.copy(path, tmp_path / "log" / path.name)
    assert log.rounds() == [1, 2, 3] and log.snapshot_round() == 3
    assert_same_replica(replayed(log), directly_merged(3))
    assert log.rounds() == []


def test_a_snapshot_cut_short_by_a_crash_is_never_read(tmp_path):
    log = ReplicaLog(tmp_path)
    record(log, 0, 2)
    (tmp_path / f".tmp-{SNAPSHOT_FILE}").write_bytes(b"\x00" * 10)  # what a crash mid-write leaves
    assert_same_replica(replayed(log), directly_merged(2))


def test_the_snapshot_holds_only_the_weights_merges_changed_and_their_carry(tmp_path):
    log = ReplicaLog(tmp_path)
    record(log, 0, 4)
    replayed(log)
    assert set(load_file(tmp_path / SNAPSHOT_FILE)) == {f"{part}/{module}" for part in ("weight", "carry")
                                                         for module in (Q0, V1)}

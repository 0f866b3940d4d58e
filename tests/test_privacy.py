"""Differential privacy on tiny-llama: DP-SGD's clipping and noise, each client's (ε, δ) against
Opacus' accountant, resume, the refusals, Flower, and a DP run on SmolLM2 that still learns."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.data import Record, collate, tokenize_records
from fedlora.engine.checkpoint import load_latest_checkpoint
from fedlora.engine.config import ConfigError, build_config, save_config
from fedlora.engine.dp_sgd import private_steps
from fedlora.engine.metrics import read_metrics, write_summary
from fedlora.engine.setup import prepare_run
from fedlora.aggregation import ClientPlan
from fedlora.engine.task import ClientTask
from fedlora.lora import attach_lora, remove_lora, set_trainable
from fedlora.models import load_model, pad_token_id
from fedlora.report import write_report
from fedlora.runtime.inprocess import run_inprocess

from support import DOLLY, run_on_in_memory_flower

TARGETS = ["q_proj", "v_proj"]
SIZES = {"0": 8, "1": 12, "2": 20}  # conftest's client_dir
DP = {"noise_multiplier": 1.1, "max_grad_norm": 0.5, "delta": 1e-3, "seed": 3}
CLIENT_DP = {"noise_multiplier": 0.8, "clip_norm": 0.05, "delta": 1e-3, "seed": 4}
# for a small ε Opacus warns that its largest RDP order is the best one (the bound stays valid)
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
PRIVACY_KEYS = ("round", "clients", "eval_loss", "train_loss", "privacy", "client_privacy")


def tiny_values(client_dir: Path, out: Path, **overrides) -> dict:
    return {"model": "tiny-llama", "data": str(client_dir), "method": "ffa", "rounds": 3, "clients_per_round": 2,
            "local_steps": 2, "batch_size": 2, "max_length": 48, "ranks": [4], "lr": 1e-2, "out": str(out),
            "dp": DP, "client_dp": CLIENT_DP,
            "validation_fraction": 0.0,  # every record trains: the accountant's sample rates are 2 / SIZES
            **overrides}


def run(values: dict) -> tuple[list[dict], dict]:
    config = build_config(values)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    summary = run_inprocess(prepare_run(config, out, log=lambda message: None))
    return read_metrics(out), summary


def privacy_view(rows: list[dict]) -> list[dict]:
    return [{key: row.get(key) for key in PRIVACY_KEYS} for row in rows]


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


# --- DP-SGD on one client --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """tiny-llama, its pad id, and five examples of different lengths."""
    model, tokenizer = load_model("tiny-llama")
    records = [Record(f"Question {i}: name a colour.", "" if i % 2 else f"Context {i} " * i,
                      f"Answer {i}: " + "red green blue " * (i + 1)) for i in range(5)]
    examples, _ = tokenize_records(tokenizer, records, 48)
    return model, pad_token_id(tokenizer), examples


def lora_with_nonzero_B(model, seed: int):
    """A rank-16 LoRA with both factors trainable and B drawn, so that A has gradients too."""
    peft_model = attach_lora(model, 16, 32, TARGETS, seed=seed)
    set_trainable(peft_model, {"A", "B"})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def dp_task(steps: int, noise_multiplier: float, clip: float, seed: int) -> ClientTask:
    return ClientTask(client_id="0", server_round=1, plan=ClientPlan(rank=16), alpha=32, init_seed=0,
                      data_seed=0, local_steps=steps, dp_noise_multiplier=noise_multiplier, dp_max_grad_norm=clip,
                      dp_noise_seed=seed)


def one_sgd_step(model, pad, examples, noise_multiplier: float, clip: float, seed: int, start_seed: int = 1):
    """(parameters before, after) one DP-SGD step with lr 1 over all examples (q = 1: batch_size 2
    × grad_accum 3 ≥ 5 examples, so the Poisson batch is all of them, in micro-batches 2, 2, 1)."""
    peft_model, params = lora_with_nonzero_B(model, start_seed)
    try:
        before = [p.detach().clone() for p in params]
        private_steps(peft_model, torch.optim.SGD(params, lr=1.0), dp_task(1, noise_multiplier, clip, seed), examples,
                      pad_token_id=pad, batch_size=2, grad_accum=3)
        return before, [p.detach().clone() for p in params]
    finally:
        remove_lora(peft_model)


def test_dp_sgd_clips_every_per_example_gradient_before_summing(tiny):
    model, pad, examples = tiny
    peft_model, params = lora_with_nonzero_B(model, 1)
    try:  # each example alone, through the model's own loss (its response tokens' mean NLL)
        grads = [torch.autograd.grad(peft_model(**collate([example], pad)).loss, params) for example in examples]
    finally:
        remove_lora(peft_model)
    norms = [float(torch.sqrt(sum(g.double().square().sum() for g in grad))) for grad in grads]
    clip = statistics.median(norms)
    assert min(norms) < clip < max(norms)  # some examples are clipped, some are not

    before, after = one_sgd_step(model, pad, examples, noise_multiplier=0.0, clip=clip, seed=0)
    clipped = [sum(grad[i].double() * min(1.0, clip / norm) for grad, norm in zip(grads, norms))
               for i in range(len(params))]
    for start, end, clipped_sum in zip(before, after, clipped):
        assert torch.allclose(end.double(), start.double() - clipped_sum / len(examples), rtol=1e-4, atol=1e-8)
    # the tolerance tells clipped from unclipped: the plain sum is 1.5 % away
    plain = [sum(grad[i].double() for grad in grads) for i in range(len(params))]
    gap = torch.sqrt(sum((c - p).square().sum() for c, p in zip(clipped, plain)) / sum(p.square().sum() for p in plain))
    assert gap > 1e-2


def test_dp_sgd_noise_has_standard_deviation_noise_multiplier_times_clip_over_expected_batch(tiny):
    # Two steps from the same start on the same (whole) batch differ only in their noise:
    # (n₁ − n₂)/5 with n ~ N(0, σ²C²) per coordinate, so a standard deviation √2·σC/5.
    # 7168 coordinates: relative standard error of the sample standard deviation 0.8 %.
    model, pad, examples = tiny
    sigma, clip = 0.8, 0.01
    _, first = one_sgd_step(model, pad, examples, sigma, clip, seed=10)
    _, second = one_sgd_step(model, pad, examples, sigma, clip, seed=11)
    difference = torch.cat([(a - b).flatten() for a, b in zip(first, second)])
    expected = 2 ** 0.5 * sigma * clip / len(examples)
    assert difference.numel() == 7168
    assert abs(difference.std().item() / expected - 1) < 0.05  # > 6 standard errors
    _, again = one_sgd_step(model, pad, examples, sigma, clip, seed=10)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded noise is reproducible


def test_an_empty_poisson_batch_is_a_step_of_noise_alone(tiny):
    model, pad, examples = tiny
    peft_model, params = lora_with_nonzero_B(model, 1)
    try:
        before = [p.detach().clone() for p in params]
        # rate 1/5: with this seed the first of the steps draws no example
        losses, processed = private_steps(peft_model, torch.optim.SGD(params, lr=1.0), dp_task(8, 1.0, 0.1, seed=2),
                                          examples, pad_token_id=pad, batch_size=1, grad_accum=1)
        moved = any(not torch.equal(a, b) for a, b in zip(before, params))
    finally:
        remove_lora(peft_model)
    assert any(loss != loss for loss in losses) and any(loss == loss for loss in losses)
    assert 0 < processed < 8 * len(examples)  # the Poisson batches' sizes, some of them empty
    assert moved


# --- the run's accountant ----------------------------------------------------------------------

def test_each_clients_epsilon_is_opacus_rdp_over_the_steps_of_the_rounds_it_joined(client_dir, tmp_path):
    values = tiny_values(client_dir, tmp_path / "run",
                         dp={"target_epsilon": 4.0, "max_grad_norm": 0.5, "delta": 1e-3, "seed": 3})
    rows, summary = run(values)
    sigma = summary["privacy_noise_multipliers"]["privacy"]
    joined = {cid: sum(cid in row["clients"] for row in rows) for cid in SIZES}
    assert sorted(joined.values()) != [3, 3, 3] and all(joined.values())  # partial participation

    epsilons = {}
    for cid, size in SIZES.items():
        rate, steps = 2 / size, joined[cid] * 2  # batch 2, grad_accum 1; 2 local steps
        epsilons[cid] = rdp_epsilon(sigma, rate, steps, 1e-3)
        assert summary["privacy"][cid] == {"epsilon": epsilons[cid], "delta": 1e-3}
        client_level = rdp_epsilon(CLIENT_DP["noise_multiplier"], 1.0, joined[cid], 1e-3)
        assert summary["client_privacy"][cid] == {"epsilon": client_level, "delta": 1e-3}
    # σ was calibrated before training so that the worst client's planned schedule meets the target
    worst = max(SIZES, key=lambda cid: epsilons[cid])
    assert 4.0 - 0.011 <= epsilons[worst] <= 4.0
    assert sigma == get_noise_multiplier(target_epsilon=4.0, target_delta=1e-3, sample_rate=2 / SIZES[worst],
                                         steps=joined[worst] * 2)
    # every row holds the budget spent so far; round 0 has spent nothing
    assert all(entry["epsilon"] == 0 for entry in rows[0]["privacy"].values())
    assert rows[-1]["privacy"] == summary["privacy"]
    assert [row["privacy"]["0"]["epsilon"] for row in rows] == sorted(row["privacy"]["0"]["epsilon"] for row in rows)

    write_summary(tmp_path / "run", summary)
    write_report(tmp_path / "run")
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "### Differential privacy" in report and f"{epsilons[worst]:.4g}" in report


def test_resume_keeps_the_accountants_history(client_dir, tmp_path):
    values = tiny_values(client_dir, tmp_path / "split",
                         dp={"target_epsilon": 6.0, "max_grad_norm": 0.5, "delta": 1e-3, "seed": 3})
    full, _ = run({**values, "out": str(tmp_path / "full")})

    # a run stopped after round 2 (as by a kill), then resumed by a fresh process
    config = build_config(values)
    (tmp_path / "split").mkdir()
    save_config(config, tmp_path / "split" / "config.json")
    setup = prepare_run(config, tmp_path / "split", log=lambda message: None)
    federation = setup.federation
    federation.start()
    for server_round in (1, 2):
        tasks = federation.configure_train(server_round)
        federation.aggregate_train(server_round, [setup.trainer.train(task, setup.client_examples[task.client_id])
                                                  for task in tasks])
    state, _ = load_latest_checkpoint(tmp_path / "split")
    sigma = federation.privacy.sample.noise_multiplier
    for cid, size in SIZES.items():
        steps = 2 * sum(cid in row["clients"] for row in full[1:3])
        assert state["privacy"]["privacy"][cid] == ([[sigma, 2 / size, steps]] if steps else [])
    resumed, _ = run(values)
    assert privacy_view(resumed) == privacy_view(full)


@pytest.mark.parametrize("method", ["ffa", "rolora", "fedsa"])
def test_every_summed_factor_method_runs_with_both_dp_levels(client_dir, tmp_path, method):
    rows, summary = run(tiny_values(client_dir, tmp_path / method, method=method, rounds=2, local_steps=1))
    assert [row["round"] for row in rows] == [0, 1, 2] and not any(row["skipped"] for row in rows)
    assert all(row["dp_noise_std"] == 0.8 * 0.05 / 2 for row in rows[1:])
    assert set(summary["client_privacy"]) == set(SIZES) and set(summary["privacy"]) == set(SIZES)


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["flora", "flexlora"])
def test_client_level_dp_is_refused_for_stacking_methods(client_dir, tmp_path, method):
    with pytest.raises(ConfigError, match="'client_dp'.*stacking method broadcasts every client's own factors"):
        build_config(tiny_values(client_dir, tmp_path, method=method, ranks=[4]))


@pytest.mark.parametrize(("key", "table", "message"), [
    ("dp", {"noise_multiplier": 1.0, "target_epsilon": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}, "exactly one"),
    ("dp", {"noise_multiplier": 1.0, "delta": 1e-5}, "needs 'max_grad_norm'"),
    ("dp", {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.5}, "'delta' must be below 1"),
    ("client_dp", {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}, "unknown keys"),
    ("client_dp", {"target_epsilon": -1, "clip_norm": 1.0, "delta": 1e-5}, "'target_epsilon' must be a positive"),
])
def test_bad_privacy_tables_are_config_errors_naming_the_key(client_dir, tmp_path, key, table, message):
    with pytest.raises(ConfigError, match=f"'{key}' .*{message}"):
        build_config({**tiny_values(client_dir, tmp_path), key: table})


def test_dp_with_data_on_the_nodes_is_refused(client_dir, tmp_path):
    with pytest.raises(ConfigError, match="'data_on_nodes'.*sizes"):
        build_config({**tiny_values(client_dir, tmp_path), "client_dp": {}, "runtime": "flower",
                      "superlink": "127.0.0.1:9092", "data_on_nodes": True, "clients": 3})


# --- slow: Flower processes, SmolLM2 ---------------------------------------------------------------

def test_flower_run_with_both_dp_levels_equals_the_in_process_run(client_dir, tmp_path, server_identity):
    """Over Flower's strategy and ClientApp, every message serialised (support's in-memory grid):
    a DP-SGD client withholds its train loss and the server still accounts both levels alike."""
    values = tiny_values(client_dir, tmp_path / "flower", rounds=2, clients_per_round=1, local_steps=1)
    flower_summary, _ = run_on_in_memory_flower(build_config({**values, "runtime": "flower"}), tmp_path / "nodes")
    rows, summary = run({**values, "out": str(tmp_path / "inprocess")})
    flower_rows = read_metrics(tmp_path / "flower")
    assert [row["clients"] for row in flower_rows] == [row["clients"] for row in rows] == [[], ["0"], ["1"]]
    assert privacy_view(flower_rows) == privacy_view(rows)
    assert flower_summary["privacy"] == summary["privacy"]
    assert any(entry["epsilon"] > 0 for entry in summary["client_privacy"].values())


@pytest.mark.slow
@pytest.mark.skipif(not DOLLY.is_dir(), reason=f"the shared Dolly data is not at {DOLLY}")
def test_a_dp_run_on_smollm2_still_lowers_the_held_out_loss(smollm2_cache, tmp_path):
    loaded = load_model("smollm2-135m", device="cpu", gguf_cache=smollm2_cache)
    config = build_config({"model": "smollm2-135m", "data": str(DOLLY), "clients": 1, "method": "ffa", "rounds": 1,
                           "local_steps": 3, "batch_size": 8, "max_length": 64, "ranks": [8], "lr": 5e-3,
                           "test_limit": 8, "mmlu_limit": 1, "validation_fraction": 0.001, "out": str(tmp_path),
                           "dp": {"noise_multiplier": 0.5, "max_grad_norm": 1.0, "delta": 1e-4, "seed": 0}})
    summary = run_inprocess(prepare_run(config, tmp_path, log=lambda message: None, loaded=loaded))
    rows = read_metrics(tmp_path)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.005  # seeded noise: the same run every time
    assert 1 < summary["privacy"]["0"]["epsilon"] < 5  # σ 0.5, q = 8/826, 3 steps: ε ≈ 3.8 at δ = 1e-4

"""ShapEGRPOTrainer: smoke per allocation, equivalence with stock GRPOTrainer at lam = 0, the advantage hook,
malformed completions and failed scorers. Real TRL, real tiny models, CPU."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from trainer_fixtures import random_policy, tiny_config, tiny_settings, tiny_task, tiny_warm_start
from trl import GRPOConfig, GRPOTrainer

from shapegrpo_core.batch_credit import BatchCredit, ResponseCredit, credit_responses
from shapegrpo_core.candidates import Candidate
from shapegrpo_core.games import Game
from shapegrpo_core.policy import load_policy
from shapegrpo_core.tasks.recsys import RecsysTask
from shapegrpo_core.trainer import (
    METRIC_PREFIX,
    SetUtilityReward,
    ShapEGRPOConfig,
    ShapEGRPOTrainer,
    completion_text,
)

torch.set_num_threads(1)

CREDIT_METRICS = (
    "set_utility",
    "candidate_utility",
    "best_candidate_utility",
    "free_rider_rate",
    "duplicate_rate",
    "format_valid_rate",
    "mean_abs_phi",
    "nan_sets",
    "engine/closed_form",
    "identical_group_rate",
    "tied_group_rate",
)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _group_inputs(task: RecsysTask, num_prompts: int = 2, num_generations: int = 4) -> list[dict[str, Any]]:
    """A generation batch as TRL's sampler yields it: each prompt's row repeated G times, consecutively."""
    rows = task.build_dataset("train", 0).select(range(num_prompts))
    return [dict(row) for row in rows for _ in range(num_generations)]


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("allocation", "banzhaf"),
        ("lam", 1.5),
        ("lam", -0.1),
        ("num_candidates", 0),
        ("shapley_engine", "magic"),
        ("mc_permutations", 0),
        ("scorer_errors", "ignore"),
        ("token_weighting", "per_char"),
        ("missing_slots", "fill"),
        ("loss_type", "vespo"),
        ("loss_type", "sapo"),
        ("off_policy_mask_threshold", 0.5),
        ("multi_objective_aggregation", "normalize_then_sum"),
        ("reward_weights", [2.0]),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(tmp_path, **{field: value})


def test_trainer_rejects_reward_funcs_and_plain_grpo_config(tmp_path):
    task = tiny_task()
    model, tok = random_policy(task)
    with pytest.raises(ValueError, match="reward_funcs"):
        ShapEGRPOTrainer(model, task, args=tiny_config(tmp_path), processing_class=tok, reward_funcs=[len])
    with pytest.raises(ValueError, match="ShapEGRPOConfig"):
        ShapEGRPOTrainer(model, task, args=GRPOConfig(**tiny_settings(tmp_path)), processing_class=tok)


# ------------------------------------------------------------------------------------------------------------
# Smoke: every allocation trains and logs its credit metrics
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "shapley", "loo", "wta"])
def test_smoke_each_allocation_trains_and_logs_credit_metrics(tmp_path, allocation):
    task = tiny_task()
    model, tok = load_policy(tiny_warm_start())
    before = _params(model)
    lam = 0.0 if allocation == "uniform" else 1.0
    trainer = ShapEGRPOTrainer(
        model, task, args=tiny_config(tmp_path, allocation=allocation, lam=lam), processing_class=tok
    )
    trainer.train()

    assert trainer.state.global_step == 2
    changed = [not torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)]
    assert any(changed), "no parameter changed after two steps"
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    for entry in steps:
        for name in CREDIT_METRICS:
            assert f"{METRIC_PREFIX}/{name}" in entry, name
        assert math.isfinite(entry[f"{METRIC_PREFIX}/set_utility"])
        assert 0.0 <= entry[f"{METRIC_PREFIX}/format_valid_rate"] <= 1.0
        assert entry[f"{METRIC_PREFIX}/nan_sets"] == 0
        engine = allocation if allocation in ("loo", "wta") else "closed_form"
        assert entry[f"{METRIC_PREFIX}/engine/{engine}"] == 1.0
        # TRL's reward is the set utility, so its reward metric and ours agree.
        assert entry["reward"] == pytest.approx(entry[f"{METRIC_PREFIX}/set_utility"], abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# lam = 0 is GRPO
# ------------------------------------------------------------------------------------------------------------


def test_lam0_loss_and_update_match_stock_grpo_trainer(tmp_path):
    """Same seed, data, model and reward (the set utility): step-1 loss to 1e-5 and the updated weights."""
    task = tiny_task()
    dataset = task.build_dataset("train", 0)
    runs: dict[str, tuple[dict[str, Any], list[torch.Tensor]]] = {}
    for name in ("stock", "shapley_lam0", "uniform", "shapley_lam1"):
        model, tok = load_policy(tiny_warm_start())
        out = tmp_path / name
        if name == "stock":
            args = GRPOConfig(**tiny_settings(out, max_steps=1))
            trainer = GRPOTrainer(
                model,
                reward_funcs=[SetUtilityReward(task)],
                args=args,
                train_dataset=dataset,
                processing_class=tok,
            )
        else:
            allocation, lam = {"shapley_lam0": ("shapley", 0.0), "uniform": ("uniform", 1.0)}.get(
                name, ("shapley", 1.0)
            )
            args = tiny_config(out, max_steps=1, allocation=allocation, lam=lam)
            trainer = ShapEGRPOTrainer(model, task, args=args, train_dataset=dataset, processing_class=tok)
        trainer.train()
        runs[name] = (trainer.state.log_history[0], _params(model))

    stock_log, stock_params = runs["stock"]
    assert stock_log["reward_std"] > 0, "degenerate batch: no GRPO signal to compare"
    assert stock_log["loss"] != 0.0
    for name in ("shapley_lam0", "uniform"):
        log, params = runs[name]
        assert log["reward"] == pytest.approx(stock_log["reward"], abs=1e-7)
        assert abs(log["loss"] - stock_log["loss"]) <= 1e-5, (name, log["loss"], stock_log["loss"])
        for a, b in zip(params, stock_params, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Sanity: Shapley credit (lam = 1) does change the update.
    lam1_params = runs["shapley_lam1"][1]
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(lam1_params, stock_params, strict=True))


# ------------------------------------------------------------------------------------------------------------
# The hook itself
# ------------------------------------------------------------------------------------------------------------


def test_hook_lam0_token_advantages_equal_trl_advantages(tmp_path):
    """Shapley allocation at lam = 0 goes through the whole credit + token path and gives TRL's advantages."""
    task = tiny_task()
    model, tok = load_policy(tiny_warm_start())
    trainer = ShapEGRPOTrainer(
        model, task, args=tiny_config(tmp_path, allocation="shapley", lam=0.0), processing_class=tok
    )
    trainer.model.train()
    inputs = _group_inputs(task)
    torch.manual_seed(123)
    trl_out = GRPOTrainer._generate_and_score_completions(trainer, [dict(x) for x in inputs])
    trainer.set_utility_reward.pop(trl_out["completion_ids"].tolist(), tok.pad_token_id)  # drop TRL's call
    torch.manual_seed(123)
    out = trainer._generate_and_score_completions([dict(x) for x in inputs])

    assert torch.equal(out["completion_ids"], trl_out["completion_ids"])
    adv = out["advantages"]
    assert adv.shape == out["completion_ids"].shape
    mask = out["completion_mask"].bool()
    expected = trl_out["advantages"].unsqueeze(1).expand_as(adv)
    torch.testing.assert_close(adv[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert torch.all(adv[~mask] == 0)


def test_hook_shapley_gives_candidates_different_advantages(tmp_path):
    task = tiny_task()
    model, tok = load_policy(tiny_warm_start())
    trainer = ShapEGRPOTrainer(model, task, args=tiny_config(tmp_path), processing_class=tok)
    trainer.model.train()
    torch.manual_seed(5)
    out = trainer._generate_and_score_completions(_group_inputs(task, num_prompts=4))
    adv, mask = out["advantages"], out["completion_mask"].bool()
    assert adv.shape == out["completion_ids"].shape and torch.isfinite(adv).all()
    distinct = [len(torch.unique(adv[i][mask[i]])) for i in range(adv.shape[0])]
    assert max(distinct) >= 2, "no response got per-candidate credit"
    assert trainer._metrics["train"][f"{METRIC_PREFIX}/within_set_adv_std"][-1] > 0


# ------------------------------------------------------------------------------------------------------------
# Malformed completions and failed scorers
# ------------------------------------------------------------------------------------------------------------

# Completions for 2 prompts x G = 4, in rollout order. Only " i1, i2, i3, i4" is well-formed.
MALFORMED = [
    "",  # nothing
    " i1",  # too few
    " i1, i2, i3, i4, i5, i6",  # too many
    " i1, i1, i1, i1",  # duplicates
    " drama, : , history ->",  # garbage words
    " i1, i2, i3, i4",  # valid
    " ,,,,",  # separators only
    " i5 i6, i7 i8",  # run-together candidates (not items)
]
NO_EOS = 2  # this completion is "truncated": no EOS token


def scripted_rollout(completions: Sequence[str]):
    """A TRL ``rollout_func`` that returns fixed completions (TRL's supported custom-rollout hook)."""

    def rollout(prompts: list[str], trainer: GRPOTrainer) -> dict[str, Any]:
        tok = trainer.processing_class
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        completion_ids = []
        for i in range(len(prompts)):
            ids = tok(completions[i % len(completions)], add_special_tokens=False)["input_ids"]
            completion_ids.append(ids if i == NO_EOS else [*ids, tok.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


def malformed_trainer(task: RecsysTask, output_dir: Any) -> ShapEGRPOTrainer:
    """A trainer on the tiny warm start whose rollouts are the scripted MALFORMED completions."""
    model, tok = load_policy(tiny_warm_start())
    return ShapEGRPOTrainer(
        model,
        task,
        args=tiny_config(output_dir),
        processing_class=tok,
        rollout_func=scripted_rollout(MALFORMED),
    )


def test_malformed_completions_train_and_show_in_format_metrics(tmp_path):
    task = tiny_task()
    trainer = malformed_trainer(task, tmp_path)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    for entry in steps:
        assert entry[f"{METRIC_PREFIX}/format_valid_rate"] == pytest.approx(1 / 8)
        assert entry[f"{METRIC_PREFIX}/parse_failure_rate"] == pytest.approx(2 / 8)  # "" and " ,,,,"
        assert entry[f"{METRIC_PREFIX}/duplicate_rate"] > 0
        assert entry[f"{METRIC_PREFIX}/nan_sets"] == 0
        assert math.isfinite(entry["loss"])


def test_malformed_rows_get_the_set_advantage_on_every_token(tmp_path):
    task = tiny_task()
    trainer = malformed_trainer(task, tmp_path)
    trainer.model.train()
    out = trainer._generate_and_score_completions(_group_inputs(task))
    adv, mask = out["advantages"], out["completion_mask"].bool()
    assert torch.isfinite(adv).all()
    for row in (0, 6):  # no candidate at all: one pseudo-candidate with rho = R, so every token gets A_g
        values = adv[row][mask[row]]
        assert torch.allclose(values, values[0].expand_as(values))


def test_random_init_policy_garbage_trains(tmp_path):
    """A random-init model emits garbage (stray words, missing separators, no EOS): no error, metrics low."""
    task = tiny_task()
    model, tok = random_policy(task)
    trainer = ShapEGRPOTrainer(model, task, args=tiny_config(tmp_path), processing_class=tok)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    for entry in steps:
        assert entry[f"{METRIC_PREFIX}/format_valid_rate"] < 0.5
        assert math.isfinite(entry["loss"])


class FlakyScorerTask(RecsysTask):
    """A recsys task whose scorer raises for any response naming a genre (a stand-in for a failing scorer)."""

    def __init__(self, fail_all: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_all = fail_all

    def game(self, candidates: Sequence[Candidate], example: Mapping[str, Any]) -> Game:
        if self.fail_all or any("drama" in c.text for c in candidates):
            raise ValueError("scorer crashed")
        return super().game(candidates, example)


def _flaky(fail_all: bool = False) -> FlakyScorerTask:
    return FlakyScorerTask(
        fail_all=fail_all, num_items=40, num_genres=6, num_train_users=64, num_eval_users=16, seed=0
    )


def test_failed_scorer_gives_zero_advantage_and_is_counted(tmp_path):
    task = _flaky()
    trainer = malformed_trainer(task, tmp_path)
    trainer.model.train()
    out = trainer._generate_and_score_completions(_group_inputs(task))
    assert torch.all(out["advantages"][4] == 0)  # " drama, : , history ->" failed to score
    metrics = trainer._metrics["train"]
    assert metrics[f"{METRIC_PREFIX}/nan_sets"][-1] == 1
    # The failed response still counts in the format metrics (it parsed into 3 candidates).
    assert metrics[f"{METRIC_PREFIX}/parse_failure_rate"][-1] == pytest.approx(2 / 8)
    assert metrics[f"{METRIC_PREFIX}/num_candidates"][-1] == pytest.approx(
        (0 + 1 + 6 + 4 + 3 + 4 + 0 + 2) / 8
    )
    assert torch.isfinite(out["advantages"]).all()
    trainer.train()  # and training goes on
    assert trainer.state.global_step == 2


def test_scorer_failing_everywhere_raises(tmp_path):
    task = _flaky(fail_all=True)
    model, tok = load_policy(tiny_warm_start())
    trainer = ShapEGRPOTrainer(model, task, args=tiny_config(tmp_path), processing_class=tok)
    with pytest.raises(RuntimeError, match="every response"):
        trainer.train()
    strict = ShapEGRPOTrainer(
        model, task, args=tiny_config(tmp_path / "strict", scorer_errors="raise"), processing_class=tok
    )
    with pytest.raises(ValueError, match="scorer crashed"):
        strict.train()


# ------------------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------------------


def test_set_utility_reward_reads_chat_completions_and_caches_scores():
    task = tiny_task()
    reward = SetUtilityReward(task)
    row = dict(task.build_dataset("train", 0)[0])
    columns = {k: [v, v] for k, v in row.items() if k != "prompt"}
    completions = [" i6, i21, i33, i34", [{"role": "assistant", "content": " i6, i6"}]]
    values = reward(
        prompts=[row["prompt"]] * 2, completions=completions, completion_ids=[[1], [2]], **columns
    )
    assert values[0] == pytest.approx(task.utility(" i6, i21, i33, i34", row))
    assert values[1] == pytest.approx(task.utility(" i6, i6", row))
    with pytest.raises(RuntimeError, match="never scored"):
        reward.pop([[1, 0], [3, 0]], pad_token_id=0)  # not the ids it scored
    batch = reward.pop([[1, 0], [2, 0]], pad_token_id=0)  # the scored ids, right-padded as TRL pads them
    assert [s.num_scored for s in batch.scores] == [4, 2]
    assert batch.scores[1].num_duplicates == 1
    with pytest.raises(RuntimeError, match="never scored"):
        reward.pop([[1, 0], [2, 0]], pad_token_id=0)  # popped once: a stale batch is never reused
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) == "a"


def test_format_penalty_shifts_the_game_of_invalid_responses():
    """A format-invalid response's reward drops by p; its phi is unchanged, every rho drops by p (so the mean
    of rho is still the penalised R), and the set-utility metric stays unpenalised."""

    task = tiny_task()
    row = dict(task.build_dataset("train", 0)[0])
    columns = {k: [v, v] for k, v in row.items() if k != "prompt"}
    valid, invalid = " i6, i21, i33, i34", " i6, i21, i33, i34, i40"  # the second has K + 1 candidates
    reward = SetUtilityReward(task, format_penalty=0.25)
    values = reward(
        prompts=[row["prompt"]] * 2, completions=[valid, invalid], completion_ids=[[1], [2]], **columns
    )
    utility = task.utility(valid, row)
    assert values == pytest.approx([utility, utility - 0.25])
    batch = reward.pop([[1], [2]], pad_token_id=0)
    assert batch.format_valid == [True, False]

    def credit(penalty: float) -> BatchCredit:
        rows = credit_responses(batch.scores, "shapley", format_penalty=penalty)
        return BatchCredit.from_responses(rows, 2, allocation="shapley", num_slots=4)

    plain, shifted = credit(0.0), credit(0.25)
    np.testing.assert_allclose(shifted.phi, plain.phi)
    np.testing.assert_allclose(shifted.set_reward, plain.set_reward - [0.0, 0.25])
    np.testing.assert_allclose(shifted.u0, plain.u0 - [0.0, 0.25])
    np.testing.assert_allclose(np.nanmean(shifted.rho, axis=1), shifted.set_reward)
    assert shifted.metrics()["set_utility"] == pytest.approx(plain.metrics()["set_utility"])
    with pytest.raises(ValueError, match="format_penalty"):
        tiny_config("/tmp/unused", format_penalty=-1.0)


def test_free_rider_rate_counts_null_candidates_of_valuable_sets():
    def row(reward: float, phi: list[float]) -> ResponseCredit:
        k = len(phi)
        return ResponseCredit(
            reward, 0.0, 0.0, phi, phi, "closed_form", "closed_form", phi, [""] * k, 0, k, True
        )

    def metrics(*rows: ResponseCredit) -> dict[str, float]:
        return BatchCredit.from_responses(rows, len(rows), allocation="shapley", num_slots=4).metrics()

    # Set 1 (R = 1): one candidate carries it, three add nothing. Set 2 (R = 0): not counted.
    m = metrics(row(1.0, [1.0, 0.0, 0.0, 0.0]), row(0.0, [0.0, 0.0]))
    assert m["free_rider_rate"] == pytest.approx(3 / 4)
    assert m["mean_abs_phi"] == pytest.approx(1 / 6)
    assert np.isnan(metrics(row(0.0, [0.0]), row(0.0, [0.0]))["free_rider_rate"])


def test_config_documents_every_new_field():
    doc = ShapEGRPOConfig.__doc__ or ""
    for name in (
        "allocation",
        "lam",
        "num_candidates",
        "shapley_engine",
        "mc_permutations",
        "max_exact_players",
        "shapley_seed",
        "format_penalty",
        "scorer_errors",
        "token_weighting",
        "missing_slots",
    ):
        assert f"{name} (" in doc, name


def test_train_policy_method_table():
    from shapegrpo_core.training import METHODS, method_settings, train_policy

    assert METHODS == {
        "grpo": ("uniform", 0.0),
        "shapegrpo": ("shapley", 1.0),
        "loo": ("loo", 1.0),
        "wta": ("wta", 1.0),
    }
    assert method_settings("loo") == ("loo", 1.0)
    with pytest.raises(ValueError, match="unknown method"):
        train_policy(tiny_task(), "/nonexistent", "/tmp/unused", method="ppo")


def test_grpo_parity_check_tolerates_float32_on_tight_groups_and_catches_real_differences():
    # Rewards near 0.9 that differ by 1e-5: float32 rounding alone moves TRL's advantages visibly.
    rewards = np.array([0.9, 0.90001, 0.90002, 0.90003])
    std = rewards.std(ddof=1)
    ours = (rewards - rewards.mean()) / (std + 1e-4)
    r32 = torch.tensor(rewards, dtype=torch.float32)
    theirs = (r32 - r32.mean()) / (r32.std() + 1e-4)
    assert np.abs(ours - theirs.double().numpy()).max() > 1e-5  # float32 rounding, magnified by 1/std
    ShapEGRPOTrainer._check_grpo_parity(ours, theirs, std + 1e-4)
    with pytest.raises(RuntimeError, match="GRPO advantages differ"):
        ShapEGRPOTrainer._check_grpo_parity(ours + 0.5, theirs, std + 1e-4)

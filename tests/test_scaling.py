"""The batch-size study's plumbing: experiment=scaling's sweep, what summary.json records for it
(config, overrides, swept keys, peak lr, the duplicate share), and refusals at start."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import yaml
from cli import REPO, records, run_train, summary
from hydra import compose, initialize_config_dir

from dist_icm.compose import register_schema, to_config
from dist_icm.loss import duplicate_share, target_groups

SCALING = REPO / "configs" / "experiment" / "scaling.yaml"
ARMS = {  # loss option -> (loss.name, dedup, per_sample)
    "ce": ("ce", False, False),
    "mixup": ("mixup", False, False),
    "icm_mixup": ("icm_mixup", False, False),
    "icm_mixup_dedup": ("icm_mixup", True, False),
    "icm_mixup_per_sample": ("icm_mixup", False, True),
}


def _sweep() -> dict[str, list[str]]:
    params = yaml.safe_load(SCALING.read_text())["hydra"]["sweeper"]["params"]
    return {k: str(v).split(",") for k, v in params.items()}


def test_the_sweep_spans_the_issue_grid():
    sweep = _sweep()
    batches = [int(b) for b in sweep["data.global_batch"]]
    assert min(batches) == 128 and max(batches) >= 8192
    assert sorted(sweep["loss"]) == sorted(ARMS) and len(sweep["train.seed"]) >= 2


def test_every_cell_of_the_sweep_composes(tmp_path):
    sweep = _sweep()
    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for batch, loss, seed in itertools.product(*sweep.values()):
            raw = compose(
                "train",
                overrides=[
                    "experiment=scaling",
                    f"data.root={tmp_path}",
                    f"data.global_batch={batch}",
                    f"loss={loss}",
                    f"train.seed={seed}",
                ],
            )
            cfg = to_config(raw)
            name, dedup, per_sample = ARMS[loss]
            assert (cfg.loss.name, cfg.loss.dedup, cfg.loss.per_sample) == (name, dedup, per_sample)
            assert cfg.data.global_batch == int(batch) and cfg.train.seed == int(seed)
            assert (cfg.model.name, cfg.data.loader, cfg.optim.lr_scaling) == (
                "tiny_cnn", "ffcv", "sqrt"
            )  # fmt: skip


def test_duplicate_share_by_hand():
    a = torch.tensor([0, 1, 0, 2, 3, 3])
    b = torch.tensor([1, 0, 1, 2, 1, 3])
    lam = torch.tensor([0.3, 0.7, 0.3, 0.5, 1.0, 0.2])
    # rows 0, 1, 2 are one vector (0.3 of class 0, 0.7 of class 1); rows 3 (a == b = 2) is
    # one-hot 2; rows 4 (lam 1) and 5 (a == b) are one-hot 3
    assert target_groups(a, b, lam).tolist().count(target_groups(a, b, lam)[0].item()) == 3
    assert duplicate_share(a, b, lam) == pytest.approx(5 / 6)
    assert duplicate_share(a, b, torch.tensor([0.3, 0.7, 0.31, 0.5, 0.9, 0.2])) == 2 / 6
    assert duplicate_share(a[:0], b[:0], lam[:0]) == 0.0


@pytest.fixture(scope="module")
def icm_one(tmp_path_factory) -> dict:
    """The quickstart with IC-Mixup on one process (shared by two tests)."""
    return _arm(tmp_path_factory.mktemp("icm"), "icm_mixup")


def _arm(tmp_path, loss: str, world: int = 1, *extra: str) -> dict:
    run = tmp_path / f"{loss}-{world}"
    run_train(run, "experiment=quickstart", f"loss={loss}", "train.epochs=1",
              "train.log_every=5", "train.tensorboard=false", *extra, world=world)  # fmt: skip
    return summary(run) | {"_records": records(run)}


def test_summary_records_what_a_study_needs(tmp_path):
    s = _arm(tmp_path, "icm_mixup_per_sample", 1, "optim.lr_scaling=linear")
    assert s["config"]["loss"]["name"] == "icm_mixup" and s["config"]["loss"]["per_sample"]
    assert s["config"]["data"]["global_batch"] == 64 and s["config"]["train"]["seed"] == 0
    assert "loss=icm_mixup_per_sample" in s["overrides"] and s["sweep_keys"] == []
    assert s["multirun"] is False
    assert s["peak_lr"] == pytest.approx(0.05 * 64 / 256)  # quickstart's lr, linearly scaled
    logged = [r["train/dup_share"] for r in s["_records"] if "train/dup_share" in r]
    assert len(logged) == 5 and s["dup_share"] == pytest.approx(sum(logged) / len(logged))
    # per-sample λ: only rows whose partner has the same class (one-hot targets) repeat
    assert 0 < s["dup_share"] < 0.3
    json.dumps(s)  # strict JSON all through


def test_one_lambda_per_batch_makes_most_targets_duplicates(tmp_path, icm_one):
    shared = icm_one["dup_share"]
    ce = _arm(tmp_path, "ce")["dup_share"]
    assert 0.95 < ce <= 1.0  # 64 labels of 10 classes: nearly every label repeats
    assert shared > 0.4  # quickstart mixes in groups of 16 with one λ for the batch


@pytest.mark.multiproc
def test_duplicate_share_spans_every_rank(tmp_path, icm_one):
    """The share is measured over the loss's whole batch (an all-gather of every rank's
    targets): the quickstart mixes the same global batch on 1 and 2 processes, so the logged
    shares are equal; a share of one rank's half of the batch alone would differ."""
    one = icm_one["_records"]
    two = _arm(tmp_path, "icm_mixup", 2)["_records"]
    shares = [[r["train/dup_share"] for r in rs if "train/dup_share" in r] for rs in (one, two)]
    assert shares[0] == shares[1]
    assert len(set(shares[0])) > 1  # the share moves from step to step: the check has teeth


def test_a_batch_larger_than_the_data_is_refused_at_start(tmp_path):
    out = run_train(tmp_path / "r", "experiment=quickstart", "data.global_batch=4096", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "dist_icm: error: data.global_batch: a micro-step's global batch of 4096 exceeds the "
        "1347 training samples (after data.fraction and data.long_tail): lower "
        "data.global_batch (or raise runtime.grad_accum)"
    ]

"""The trainer's hot path on 2 processes started like a launcher starts them: what one optimizer
step sends and reads back, and whose random numbers its model layers get.

The collectives are counted where they are dispatched (torch's ``c10d`` ops, DDP's included),
host syncs as ``_local_scalar_dense`` (what ``.item()``, ``bool()`` and ``int()`` on a tensor
become). The batches are fetched before counting: the torch data path reads labels as Python
ints on the CPU, which is loading, not a read-back from the device.
"""

import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from multiproc import run_launched
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.multiproc

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ACCUM = 2


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("c10d.") or func is torch.ops.aten._local_scalar_dense.default:
            self.ops[name.removesuffix(".default")] += 1
        return func(*args, **(kwargs or {}))


def _step_worker(rank, world, run_dir):
    from hydra import compose, initialize_config_dir

    from dist_icm import job as jobs
    from dist_icm import streams, trainer
    from dist_icm.compose import register_schema, to_config
    from dist_icm.objectives import Objective, ObjectiveConfig

    register_schema()
    overrides = ["experiment=quickstart", f"runtime.grad_accum={ACCUM}", "runtime.threads=1"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = to_config(compose("train", overrides=overrides))
    cfg.run_dir = run_dir
    build, spans = jobs.build_data, []

    def timed_build(*args, **kwargs):  # the real data set build, timed
        start = time.monotonic()
        data = build(*args, **kwargs)
        spans.append((start, time.monotonic()))
        return data

    jobs.build_data = timed_build
    job = jobs.setup(cfg)  # Accelerate sets the gloo group up from the launcher's variables
    jobs.build_data = build
    job.data.sampler.set_epoch(0)
    job.data.train.set_epoch(0)
    loader = iter(job.data.loader)
    icm = job.objective
    ce = Objective(ObjectiveConfig(name="ce"), process_group=job.rt.process_group)
    out = {"data_span": spans}
    for step, (name, objective, validate) in enumerate(
        [
            ("warm", icm, False),
            ("warm", icm, False),
            ("icm", icm, False),
            ("ce", ce, False),
            ("validated", icm, True),
        ]  # fmt: skip
    ):
        job.objective, icm.validate = objective, validate
        batches = [next(loader) for _ in range(ACCUM)]
        with _Count() as count:
            job.model.train()
            trainer.train_step(job, iter(batches), step)
        out[name] = dict(count.ops)
        out[f"rand{step}"] = torch.rand(3)  # the model stream, after the step's own draws
        streams.seed_torch("model", cfg.train.seed, step, rank)
        out[f"expected{step}"] = torch.rand(3)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_launched(_step_worker, 2, str(tmp_path_factory.mktemp("run")))


def test_the_icm_loss_adds_only_its_own_collectives_and_no_host_sync(ranks):
    for out in ranks:
        icm, ce = Counter(out["icm"]), Counter(out["ce"])
        assert ce["c10d.allreduce_"] >= 1  # DDP's gradient buckets: what plain CE costs
        # per micro-step: the triples' all-gather; the all-to-all of the columns' partial
        # logsumexps and its backward. Nothing else: no row-count gather, no all-reduce.
        extra = icm - ce
        assert extra == Counter({"c10d.allgather_": ACCUM, "c10d.alltoall_base_": 2 * ACCUM}), out
        # one read-back per optimizer step, for CE alike: is the gradient norm finite (the
        # decision to skip a non-finite step, taken after DDP's all-reduce, so alike on every
        # rank); the ICM loss adds none
        assert icm["aten._local_scalar_dense"] == ce["aten._local_scalar_dense"] == 1


def test_validation_costs_a_gather_and_host_syncs(ranks):
    # negative control: icm_loss's checks, as a library call makes them, are what was removed
    for out in ranks:
        checked, trusted = Counter(out["validated"]), Counter(out["icm"])
        assert checked["c10d.allgather_"] == trusted["c10d.allgather_"] + ACCUM
        assert checked["aten._local_scalar_dense"] >= 2 * ACCUM


def test_model_randomness_is_keyed_by_step_and_rank(ranks):
    for out in ranks:
        for step in range(5):
            assert torch.equal(out[f"rand{step}"], out[f"expected{step}"])
    assert not torch.equal(ranks[0]["rand2"], ranks[1]["rand2"])  # dropout differs by rank


def test_rank_zero_builds_the_data_before_the_others(ranks):
    # where a download or a .beton write happens once: rank 0 first, the others after it
    (zero,), (one,) = ranks[0]["data_span"], ranks[1]["data_span"]
    assert zero[1] <= one[0]

"""The paper's experiments as configs: every overlay under configs/experiment/paper/ (and every
cell of its sweep) composes through Hydra and the project's validation, matches the paper's
setup, and names an entry of dist_icm/paper_results.json; the ciFAIR data sets without a
download; the `paper` key through a real run into summary.json."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import run_train
from cli import summary as read_summary
from hydra import compose, initialize_config_dir

from dist_icm.compose import PAPER_RESULTS, paper_entries, register_schema, to_config
from dist_icm.config import Config, ConfigError
from dist_icm.data import datasets
from dist_icm.data.datasets import CIFAIR, DataError, build_datasets
from dist_icm.schedule import unread_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted(p.stem for p in (CONFIGS / "experiment" / "paper").glob("*.yaml"))


def _compose(*overrides: str, hydra: bool = False):
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def _cells(name: str, root: Path) -> tuple[dict, list[Config]]:
    """The sweep's parameters and one validated Config per cell (seeds left out: train.seed)."""
    base = [f"experiment=paper/{name}", f"data.root={root}"]
    params = {k: str(v) for k, v in _compose(*base, hydra=True).hydra.sweeper.params.items()}
    axes = [[f"{k}={v}" for v in values.split(",")] for k, values in params.items()]
    axes = [a for a, k in zip(axes, params, strict=True) if k != "train.seed"]
    cells = [to_config(_compose(*base, *cell)) for cell in itertools.product(*axes)]
    return params, cells


def _paper_setup(cfg: Config, *, model: str = "cifar_resnet34", batch: int = 128) -> None:
    """Sec. 4's implementation details."""
    assert cfg.model.name == model
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.1, 0.9)
    assert cfg.optim.weight_decay == 5e-4
    assert cfg.schedule.name == "step" and tuple(cfg.schedule.milestones) == (50, 100, 150)
    assert cfg.schedule.gamma == 0.2 and cfg.train.epochs == cfg.schedule.epochs == 200
    assert cfg.data.global_batch == batch
    assert not cfg.data.drop_last  # the code's loader keeps the short last batch (padded here)
    alpha = {"mixup": 0.2, "remix": 0.2, "regmixup": 20.0}.get(cfg.loss.method)
    if alpha is not None:
        assert cfg.loss.mix_alpha == alpha
    assert (cfg.loss.tau, cfg.loss.kappa) == (0.5, 3.0)


def _keys(cells: list[Config]) -> set[str]:
    return {c.paper for c in cells}


@pytest.mark.parametrize("name", PAPER)
def test_every_cell_composes_with_three_seeds_and_a_known_paper_key(name, tmp_path):
    params, cells = _cells(name, tmp_path)
    assert params["train.seed"] == ("0" if name == "figure4" else "0,1,2")
    entries = paper_entries()
    assert cells and all(c.paper in entries for c in cells)
    assert len(_keys(cells)) == len(cells), "two cells of one sweep share a paper key"
    assert all(unread_settings(c.schedule) == {} for c in cells)  # no setting left unused
    if name != "birds":
        assert all(c.data.augment == "cifar_rot15" for c in cells)


def test_table1_left_is_axes_by_batch_on_cifar100(tmp_path):
    _, cells = _cells("table1_left", tmp_path)
    grid = {(c.loss.axis, c.data.global_batch) for c in cells}
    assert grid == set(itertools.product(("class", "pair", "both"), (64, 128, 512)))
    for c in cells:
        assert (c.data.name, c.loss.name, c.data.fraction) == ("cifar100", "icm_mixup", 1.0)
        _paper_setup(c, batch=c.data.global_batch)
    values = {c.paper: paper_entries()[c.paper]["top1"] for c in cells}
    assert values["table1_left/both/batch_128"] == 77.90
    assert values["table1_left/pair/batch_64"] == 75.38
    assert values["table1_left/class/batch_512"] == 76.17


def test_table1_right_is_methods_by_fraction(tmp_path):
    _, cells = _cells("table1_right", tmp_path)
    _, axes = _cells("table1_right_axes", tmp_path)
    fractions = (1.0, 0.5, 0.25, 0.1)
    assert {(c.loss.name, c.data.fraction) for c in cells} == set(
        itertools.product(("ce", "mixup", "icm_mixup"), fractions)
    )
    assert {(c.loss.axis, c.data.fraction) for c in axes} == set(
        itertools.product(("class", "pair"), fractions)
    )
    for c in cells + axes:
        assert c.data.name == "cifar100" and c.data.long_tail is None
        _paper_setup(c)
    rows = {(c.loss.name, c.loss.axis, c.data.fraction): c.paper for c in cells + axes}
    top1 = {k: paper_entries()[v]["top1"] for k, v in rows.items()}
    assert top1[("ce", "both", 1.0)] == 76.52 and top1[("mixup", "both", 0.1)] == 28.21
    assert top1[("icm_mixup", "both", 1.0)] == 77.90 and top1[("icm_mixup", "class", 0.1)] == 30.38
    assert top1[("icm_mixup", "pair", 0.25)] == 50.72


def test_figure3_is_regmixup_on_both_cifars_by_fraction(tmp_path):
    _, cells = _cells("figure3", tmp_path)
    assert {(c.data.name, c.loss.name, c.data.fraction) for c in cells} == set(
        itertools.product(
            ("cifar10", "cifar100"), ("regmixup", "icm_regmixup"), (1.0, 0.5, 0.25, 0.1)
        )
    )
    for c in cells:
        _paper_setup(c)
        assert c.loss.mix_alpha == 20.0 and c.loss.regmix_weight == 1.0
    entries = paper_entries()
    assert entries["figure3/cifar100/icm_regmixup/fraction_0.1"]["top1"] == 36.91
    assert entries["figure3/cifar100/regmixup/fraction_1.0"]["top1"] == 77.99


def test_table2_left_is_cifair_with_fifty_images_per_class(tmp_path):
    for name, data, fraction in (
        ("table2_left_cifair10", "cifair10", 0.01),
        ("table2_left_cifair100", "cifair100", 0.1),
    ):
        _, cells = _cells(name, tmp_path)
        assert {c.loss.name for c in cells} == {
            "ce",
            "mixup",
            "icm_mixup",
            "regmixup",
            "icm_regmixup",
        }
        for c in cells:
            assert (c.data.name, c.data.fraction) == (data, fraction)
            _paper_setup(c)
    # 50 per class: 1% of ciFAIR-10's 5,000 per class, 10% of ciFAIR-100's 500
    assert round(0.01 * 5000) == round(0.1 * 500) == 50


def test_table2_middle_is_wrn16_8_on_cifair10(tmp_path):
    _, cells = _cells("table2_middle", tmp_path)
    assert {c.loss.name for c in cells} == {"ce", "icm_regmixup"}
    for c in cells:
        assert (c.model.name, c.data.name, c.data.fraction) == ("wrn16_8", "cifair10", 0.01)
    entries = paper_entries()
    assert (entries["table2_middle/ce"]["top1"], entries["table2_middle/icm_regmixup"]["top1"]) == (
        58.22,
        61.84,
    )


def test_table2_right_is_long_tailed_cifar(tmp_path):
    _, cells = _cells("table2_right", tmp_path)
    losses = ("ce", "mixup", "remix", "icm_mixup", "icm_remix")
    assert {(c.data.name, c.data.long_tail, c.loss.name) for c in cells} == set(
        itertools.product(("cifar10", "cifar100"), (0.1, 0.01), losses)
    )
    for c in cells:
        _paper_setup(c)
    entries = paper_entries()
    assert entries["table2_right/cifar100/rho_0.01/icm_remix"]["top1"] == 46.01
    assert entries["table2_right/cifar100/rho_0.01/mixup"]["top1"] == 39.21


def test_figure4_and_birds(tmp_path):
    _, cells = _cells("figure4", tmp_path)
    assert {(c.data.name, c.loss.name) for c in cells} == {
        ("cifar100", "mixup"),
        ("cifar100", "icm_mixup"),
    }
    for c in cells:
        _paper_setup(c)
    cifar10 = to_config(_compose("experiment=paper/figure4", "data=cifar10", "loss=mixup"))
    assert cifar10.paper == "figure4/cifar10/mixup" and cifar10.paper in paper_entries()
    _, birds = _cells("birds", tmp_path)
    for c in birds:
        assert (c.data.name, c.data.augment, c.model.name) == (
            "imagefolder",
            "imagenet",
            "cifar_resnet34",
        )
        _paper_setup(c, batch=16)


def test_the_numbers_file_holds_every_number_of_the_text():
    doc = json.loads(PAPER_RESULTS.read_text())
    top1 = [e["top1"] for e in doc["results"].values()]
    assert all(v is None or 0 < v < 100 for v in top1)
    # Table 1: 9 + 20 cells; Figure 3: 4 numbers in the text; Table 2: 2 + 4 in the text
    assert sum(v is not None for v in top1) == 9 + 20 + 4 + 2 + 4


def test_the_paper_key_is_checked(tmp_path):
    assert to_config(_compose()).paper is None
    with pytest.raises(ConfigError, match="is no entry of dist_icm/paper_results.json") as info:
        to_config(_compose("experiment=paper/table1_left", "data.global_batch=256"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="paper must be a key"):
        to_config(_compose("paper=[1,2]"))
    assert to_config(_compose("experiment=paper/table1_left", "paper=null")).paper is None


def test_a_run_writes_its_paper_key_into_the_summary(tmp_path):
    run_dir = tmp_path / "run"
    key = "table1_left/both/batch_128"
    run_train(run_dir, "experiment=quickstart", f"paper={key}", "train.max_steps=2",
              "train.progress=false", "train.tensorboard=false")  # fmt: skip
    assert read_summary(run_dir)["config"]["paper"] == key


# ---------------------------------------------------------------- ciFAIR without the download


def test_cifair_configs_compose(tmp_path):
    for name in ("cifair10", "cifair100"):
        cfg = to_config(_compose(f"data={name}", f"data.root={tmp_path}"))
        assert cfg.data.name == name


@pytest.mark.parametrize("name", ["cifair10", "cifair100"])
def test_cifair_without_internet_is_one_line_naming_the_url(name, tmp_path):
    url = CIFAIR[name]["url"]
    for download in (True, False):
        try:
            build_datasets(name, str(tmp_path / name), download=download)
        except DataError as e:
            msg = str(e)
            assert "\n" not in msg and url in msg and "unzip it into" in msg
            assert f"{CIFAIR[name]['base_folder']}/" in msg
        else:
            pytest.skip(f"{name} downloaded: this machine has internet")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _release(tmp: Path, name: str, rng: np.random.Generator) -> tuple[Path, dict]:
    """A small zip in the release's layout (CIFAR pickles under ciFAIR-N/) and its checksums."""
    n_cls = 10 if name == "cifair10" else 100
    folder = tmp / "build" / CIFAIR[name]["base_folder"]
    folder.mkdir(parents=True)
    label = "labels" if n_cls == 10 else "fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] if n_cls == 10 else ["train"]
    test_file = CIFAIR[name]["test_list"][0][0]
    sizes = {f: 2 * n_cls // len(files) if n_cls == 10 else 3 * n_cls for f in files}
    sizes[test_file] = n_cls
    arrays = {}
    for f, n in sizes.items():
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = (np.arange(n) % n_cls).tolist()
        arrays[f] = (images, labels)
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": images, label: labels}, fh)
    meta_name, meta_key = (
        ("batches.meta", "label_names") if n_cls == 10 else ("meta", "fine_label_names")
    )
    with open(folder / meta_name, "wb") as fh:
        pickle.dump({meta_key: [f"class{i}" for i in range(n_cls)]}, fh)
    archive = tmp / CIFAIR[name]["filename"]
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.iterdir()):
            z.write(p, f"{folder.name}/{p.name}")
    sums = {f: _md5(folder / f) for f in [*files, test_file, meta_name]}
    return archive, {"arrays": arrays, "sums": sums, "files": files, "test": test_file,
                     "meta": (meta_name, meta_key)}  # fmt: skip


@pytest.mark.parametrize("name", ["cifair10", "cifair100"])
def test_cifair_downloads_checks_and_reads_a_release_zip(name, tmp_path, monkeypatch):
    """The real download code on a zip of the release's layout already in the root (where
    torchvision's download finds it, so no network is used): the zip's md5 is checked, it is
    unzipped, every file's md5 is checked and the images are read."""
    archive, made = _release(tmp_path, name, np.random.default_rng(0))
    info = {
        **CIFAIR[name],
        "tgz_md5": _md5(archive),
        "test_list": [[made["test"], made["sums"][made["test"]]]],
    }
    cls = datasets._cifair_class
    meta_name, meta_key = made["meta"]

    def patched(n):
        c = cls(n)
        c.tgz_md5, c.test_list = info["tgz_md5"], info["test_list"]
        c.train_list = [[f, made["sums"][f]] for f in made["files"]]
        c.meta = {"filename": meta_name, "key": meta_key, "md5": made["sums"][meta_name]}
        return c

    monkeypatch.setattr(datasets, "_cifair_class", patched)
    root = tmp_path / "root"
    root.mkdir()
    archive.rename(root / archive.name)
    train, test, spec = build_datasets(name, str(root), download=True)
    assert (root / CIFAIR[name]["filename"]).is_file() and (
        root / CIFAIR[name]["base_folder"]
    ).is_dir()
    n_cls = 10 if name == "cifair10" else 100
    assert spec.num_classes == n_cls and spec.image_size == 32 and spec.in_channels == 3
    ref = datasets.CIFAR10_MEAN if name == "cifair10" else datasets.CIFAR100_MEAN
    assert spec.mean == ref  # the training set is CIFAR's: so are its statistics
    images, labels = made["arrays"][made["test"]]
    want = torch.from_numpy(images.reshape(-1, 3, 32, 32)).float() / 255
    assert len(test) == len(labels)
    assert torch.equal(test[3][0], want[3]) and test[3][1] == labels[3]
    assert len(train) == sum(len(made["arrays"][f][1]) for f in made["files"])
    # a second build reads the unzipped files without downloading (download=false)
    again, _, _ = build_datasets(name, str(root), download=False)
    assert torch.equal(again[0][0], train[0][0])
    # a corrupt test file is refused, with the one-line message naming the URL
    (root / CIFAIR[name]["base_folder"] / made["test"]).write_bytes(b"broken")
    with pytest.raises(DataError, match="unzip it into") as e:
        build_datasets(name, str(root), download=False)
    assert "\n" not in str(e.value)

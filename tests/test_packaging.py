"""Packaging: an installed (not editable) dist_icm carries its Hydra configs and trains; the GPU
checks script refuses a machine without a GPU in one line."""

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch
from cli import REPO, run_train


def _build_wheel(out) -> zipfile.ZipFile:
    # from a fresh copy of the sources: an in-tree build/ left by an earlier build would fill in
    # what the packaging config forgot
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    for name in ("dist_icm", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)]
    try:  # the setuptools here builds it (no download) when it is recent enough
        if int(version("setuptools").split(".")[0]) >= 64:
            cmd.insert(4, "--no-build-isolation")
    except PackageNotFoundError:  # no setuptools here: pip fetches one from the registry
        pass
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = out.glob("dist_icm-*.whl")
    return zipfile.ZipFile(wheel)


def test_the_wheel_ships_every_config_and_trains_from_it(tmp_path):
    wheel = _build_wheel(tmp_path / "wheel")
    shipped = {n.removeprefix("dist_icm/") for n in wheel.namelist() if n.endswith(".yaml")}
    assert shipped == {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    # installed into a folder of its own, imported ahead of this checkout, run from elsewhere
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), wheel.filename], check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import dist_icm.startup as s; print(s.CONFIG_DIR)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip() == str(site / "dist_icm" / "configs")
    run = tmp_path / "run"
    run_train(run, "experiment=quickstart", "train.max_steps=2", "train.progress=false",
              "train.tensorboard=false", env=env, cwd=tmp_path)  # fmt: skip
    assert (run / "summary.json").is_file()


def test_the_gpu_script_says_in_one_line_that_it_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: .ci/gpu would run the GPU checks")
    out = subprocess.run(["bash", str(REPO / ".ci" / "gpu"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [".ci/gpu: error: no CUDA GPU is visible"]
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_every_console_script_names_a_function_that_answers_help(capsys):
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"dist-icm-train", "dist-icm-data", "dist-icm-launch"}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        main = getattr(importlib.import_module(module), function)
        if name == "dist-icm-train":  # Hydra's main reads sys.argv itself (test_train runs it)
            continue
        with pytest.raises(SystemExit) as info:
            main(["--help"])
        assert info.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name

"""The installed `cellfm` command: every subcommand has --help, the parser is cheap to build, flags map
to config keys, `jobs/*.py` are the same commands, and bad input ends as `error: ...` lines with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cellfm.cli import COMMANDS, build_parser, config_from_args, main
from tests.conftest import REPO, SMOKE_CONFIG

CELLFM = Path(sys.executable).with_name("cellfm")  # the console script the package installs


def test_cellfm_help_lists_every_command():
    out = subprocess.run([str(CELLFM), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("pretrain", "evaluate", "ingest", "validate", "synth", "demo", *COMMANDS):
        assert f"    {name}" in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_from_the_console_script_and_its_job_script(name):
    out = subprocess.run([str(CELLFM), name, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: cellfm {name} ")
    job = REPO / "jobs" / f"{name}.py"
    if job.exists():  # the thin script for `ray job submit` prints the same help
        script = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=60,
                                cwd=REPO)
        assert script.returncode == 0 and script.stdout == out.stdout


def test_building_the_parser_imports_no_heavy_library():
    # `cellfm --help` must stay fast: command modules import torch, ray, pandas only inside run().
    code = ("import sys; from cellfm.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'pandas', 'zarr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_flags_map_to_config_keys():
    args = build_parser().parse_args(["pretrain", "--config", str(SMOKE_CONFIG), "--num-workers", "3", "--use-gpu",
                                      "--cpus-per-worker", "4", "--run-name", "r1", "optim.epochs=2"])
    cfg = config_from_args(args)
    assert (cfg.train.num_workers, cfg.train.use_gpu, cfg.train.cpus_per_worker) == (3, True, 4.0)
    assert (cfg.train.run_name, cfg.optim.epochs) == ("r1", 2)
    assert not config_from_args(build_parser().parse_args(["pretrain"])).train.use_gpu


def test_an_abbreviated_flag_is_an_error_not_a_guess(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["evaluate", "--check", "ckpt"])  # not --checkpoint
    assert exit_info.value.code == 2 and "unrecognized arguments: --check" in capsys.readouterr().err


def test_input_errors_are_one_line_each_and_exit_2(tmp_path, capsys):
    # a manifest error (ManifestError), a bad JSON flag (ConfigError) and an unknown layout, each alone
    assert main(["validate", str(tmp_path / "missing.parquet")]) == 1  # validate reports problems, exit 1
    capsys.readouterr()
    assert main(["ingest", "--layout", "generic", "--glob", f"{tmp_path}/*.tif", "--regex", "(?P<plate>x)",
                 "--channel-map", "{not json", "--out", str(tmp_path), "--manifest", str(tmp_path / "m.parquet")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --channel-map is not valid JSON: Expecting property name enclosed in double quotes at character 1"]
    assert main(["synth", str(tmp_path / "s"), "--layout", "huge"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --layout='huge' is not one of ['benchmark', 'demo', 'tiny']"]
    assert not (tmp_path / "s").exists()
    # the family's benchmark layout has no unseen plates for the demo's second held-out set
    assert main(["demo", "data.synthetic_layout=benchmark", f"data.screen_dir={tmp_path / 'd'}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: data.synthetic_layout='benchmark' is not one of ['demo', 'tiny'] (the layouts with held-out and unseen "
        "plates)"]
    assert not (tmp_path / "d").exists()


def test_a_bug_is_not_disguised_as_bad_input(monkeypatch):
    # Only the input errors become exit code 2; anything else keeps its traceback.
    import cellfm.commands.synth as synth

    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(synth, "run", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["synth", "somewhere"])

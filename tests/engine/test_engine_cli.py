"""engine.cli: the shared flags, the run folder check (also under 2 gloo ranks), --help of every script, and
--amp's float32 fallback on CPUs without bfloat16 instructions (engine.loop)."""
import argparse
import importlib
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import ArgumentParser, UserError, add_common_args, prepare_run_dir
from engine import loop
from engine.cli import default_data_dir
from tests.helpers import free_port


def _args(out, **kw):
    return argparse.Namespace(out=str(out), overwrite=False, resume=False, lr=0.1, **kw)


def test_prepare_run_dir_refuses_another_run_unless_overwrite_or_resume(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(_args(out), files=("metrics.csv",))
    assert json.loads((out / "args.json").read_text())["lr"] == 0.1
    (out / "metrics.csv").write_text("x\n")
    with pytest.raises(UserError, match="already holds a run; pass --resume to continue it or --overwrite"):
        prepare_run_dir(_args(out, seed=1), files=("metrics.csv",))
    with pytest.raises(UserError, match=r"--resume: .* was started with other arguments: --lr 0.1 -> 0.2"):
        prepare_run_dir(argparse.Namespace(**{**vars(_args(out)), "resume": True, "lr": 0.2}), run_keys=("lr",))
    prepare_run_dir(argparse.Namespace(**{**vars(_args(out)), "resume": True}), run_keys=("lr",))
    assert (out / "metrics.csv").exists()  # resume keeps the run
    prepare_run_dir(argparse.Namespace(**{**vars(_args(out)), "overwrite": True, "lr": 0.3}), files=("metrics.csv",))
    assert not (out / "metrics.csv").exists() and json.loads((out / "args.json").read_text())["lr"] == 0.3
    with pytest.raises(UserError, match="--resume: no run to continue"):
        prepare_run_dir(argparse.Namespace(**{**vars(_args(tmp_path / "new")), "resume": True}))


def _rank(rank, port, out, errors):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:  # rank 1 arrives after rank 0 has written args.json: a late rank must not see
            # rank 0's fresh args.json as an existing run
            while not os.path.exists(os.path.join(out, "args.json")):
                time.sleep(0.01)  # a busy loop would take a core from rank 0 on a 2-core machine
        prepare_run_dir(_args(out))
        try:
            prepare_run_dir(_args(out))  # now the folder holds a run: both ranks get the same error
        except UserError as err:
            errors[rank] = str(err)
    finally:
        dist.destroy_process_group()


def test_under_two_ranks_only_rank_0_checks_and_both_get_its_verdict(tmp_path):
    port = free_port()
    errors = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank, args=(port, str(tmp_path / "run"), errors), nprocs=2)
    assert set(errors) == {0, 1} and errors[0] == errors[1] and "already holds a run" in errors[0]


def test_default_data_dir_is_not_the_data_package(monkeypatch):
    monkeypatch.delenv("RLO_DATA_DIR", raising=False)
    assert default_data_dir() == "datasets"
    monkeypatch.setenv("RLO_DATA_DIR", "/srv/data")
    p = ArgumentParser()
    add_common_args(p, out="runs/x")
    assert p.parse_args([]).data_dir == "/srv/data"


@pytest.mark.parametrize("script", ["train", "ft_opt", "opt", "regression", "gan", "llm_pipeline", "plot", "demo"])
def test_help_shows_every_default(script, capsys, monkeypatch):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: True)" not in text
    for flag in ("--out", "--seed", "--threads", "--overwrite") if script not in ("plot", "demo") else ():
        assert flag in text
    assert ("--device" in text) == (script not in ("plot", "demo", "regression"))  # regression.py: CPU float64

    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        module.main([])
    formatter = parsers[0].formatter_class(prog=script)
    undocumented = [a.option_strings for a in parsers[0]._actions if a.option_strings and a.default is not argparse.SUPPRESS
                    and a.help is not argparse.SUPPRESS and "default" not in formatter._get_help_string(a)]
    assert not undocumented


@pytest.mark.parametrize("machine,bf16,amx,device,expected", [
    ("x86_64", False, False, "cpu", False),  # emulated bf16: float32, with a note
    ("x86_64", True, False, "cpu", True), ("x86_64", False, True, "cpu", True),
    ("aarch64", False, False, "cpu", True),  # other architectures: as asked
    ("x86_64", False, False, "cuda", True)])
def test_amp_is_float32_on_a_cpu_without_bfloat16_instructions(machine, bf16, amx, device, expected, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(loop.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert loop.resolve_amp(True, device) is expected
    said = capsys.readouterr().out
    assert (said.count("\n") == 1 and "float32" in said) if not expected else said == ""
    assert loop.resolve_amp(False, device) is False and capsys.readouterr().out == ""

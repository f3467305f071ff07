"""Under torchrun / srun only rank 0 speaks on stdout; every rank's errors still reach stderr."""
from visionzoo.cli import main, process_rank


def _clean(monkeypatch):
    for name in ("RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def test_only_rank_zero_prints(monkeypatch, capsys):
    _clean(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    assert main(["list", "models", "coc_t*"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["list", "models", "coc_t*"]) == 0
    assert "coc_test" in capsys.readouterr().out
    # srun without torchrun: SLURM_PROCID of a multi-task step
    _clean(monkeypatch)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert process_rank() == 1
    assert main(["list", "models", "coc_t*"]) == 0
    assert capsys.readouterr().out == ""


def test_other_ranks_still_report_errors(monkeypatch, capsys, tmp_path):
    _clean(monkeypatch)
    monkeypatch.setenv("RANK", "3")
    assert main(["visualize", "clusters", "--model", "coc_test", "--image", str(tmp_path / "none.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "none.png" in err

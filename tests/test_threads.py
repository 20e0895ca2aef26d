"""CPU threads per process (ib/threads.py): the rule, and a real fit applying it or obeying OMP_NUM_THREADS."""
import lightning as L
import pytest
import torch

from ib.fit_cli import InstantBoothCLI
from ib.data.datamodule import InstantBoothDataModule
from ib.lit_module import InstantBoothModule
from ib.threads import available_cpus, compute_threads
from tests.conftest import edit_config, run_config


def test_rule_shares_cpus_between_ranks_and_their_workers():
    assert compute_threads(cpus=2, local_processes=1, workers=1, on_cpu=True) == 1   # was 2: 3 busy threads
    assert compute_threads(cpus=2, local_processes=1, workers=0, on_cpu=True) == 2
    assert compute_threads(cpus=64, local_processes=1, workers=8, on_cpu=True) == 56
    assert compute_threads(cpus=32, local_processes=8, workers=4, on_cpu=False) == 4  # GPU ranks: workers aside
    assert compute_threads(cpus=32, local_processes=8, workers=4, on_cpu=True) == 1   # never 0
    assert compute_threads(cpus=1, local_processes=2, workers=0, on_cpu=False) == 1


class RecordThreads(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.threads = torch.get_num_threads()


def _fit_one_step(tmp_path, shards) -> int:
    tmp_path.mkdir()
    config = edit_config(run_config(tmp_path, shards, max_steps=1, val_check_interval=1000),
                         fields={"data.loader.num_workers": 1})
    cli = InstantBoothCLI(InstantBoothModule, InstantBoothDataModule, run=False,
                          save_config_kwargs={"overwrite": True}, args=["--config", str(config)])
    recorder = RecordThreads()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder.threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_fit_sets_the_rule_or_obeys_omp_num_threads(tmp_path, synthetic_shards, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(7)
    assert _fit_one_step(tmp_path / "a", synthetic_shards) == compute_threads(available_cpus(), 1, 1, on_cpu=True)

    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's choice stands
    torch.set_num_threads(7)
    assert _fit_one_step(tmp_path / "b", synthetic_shards) == 7

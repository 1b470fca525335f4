"""A finetune run reads LLaVA JSON packed, through the datamodule's counters, end to end."""

import pytest
from datakit import toy_records, write_llava

from llavanext.cli.overrides import compose


@pytest.mark.slow
def test_finetune_packed_llava_json(tmp_path):
    from llavanext import train

    records, images = toy_records(8)
    path = write_llava(tmp_path, records, images)
    cfg = compose("finetune", ["model=tiny", "data=llava_json", f"data.path={path}", "data.packing=true",
                               "data.micro_batch_size=4", "data.num_workers=0", "data.seq_length=1024",
                               "trainer.max_steps=2", "trainer.progress_bar=none", "trainer.val_check_interval=0",
                               f"run_dir={tmp_path / 'run'}"])
    run_dir = train.run(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

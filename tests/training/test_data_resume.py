"""Training reads the same data through the background loader, with or without worker processes,
and a resumed run restarts the loader at the checkpoint's data position."""

from conftest import losses_by_step, read_metrics, run_train
from megafusion.training.checkpoint import complete_checkpoints

# The tiny Transfusion model on ShapesWorld: text and images, noise drawn per sample.
BASE = ["schedule.decay_steps=4", "logging.tensorboard=false", "checkpoint.every=2",
        "train.global_batch_size=4", "train.micro_batch_size=2"]


def test_in_process_loading_then_resume_with_workers_equals_an_uninterrupted_run(tmp_path):
    """Run A: 4 steps, 2 worker processes. Run B: 2 steps loaded in-process (== A's steps 1-2),
    then resumed to 4 with 2 workers (== A's steps 3-4)."""
    from megatron.core import dist_checkpointing

    uninterrupted = tmp_path / "a"
    run_train(uninterrupted, "tiny_transfusion.yaml", BASE + ["train.steps=4", "data.num_workers=2"])
    run = tmp_path / "b"
    run_train(run, "tiny_transfusion.yaml", BASE + ["train.steps=2", "data.num_workers=0"])
    [(step, path)] = complete_checkpoints(run)
    assert step == 2 and dist_checkpointing.load_common_state_dict(str(path))["common"]["data"] == {"step": 2, "skipped_steps": 0}
    proc = run_train(run, "tiny_transfusion.yaml", BASE + ["train.steps=4", "data.num_workers=2"])
    assert "resumed from step 2 (data step 2)" in proc.stdout

    want, got = losses_by_step(uninterrupted), losses_by_step(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # exact: the same batches, built in other processes or after a restart
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
    assert losses_by_step(run, "loss_image") == losses_by_step(uninterrupted, "loss_image")
    assert all(0 <= m["data_time_s"] <= m["step_time_s"] for m in read_metrics(run))

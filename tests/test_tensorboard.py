"""TensorBoard event files of a training run (stal_ray.train.tensorboard): tags, steps, local and s3:// run
folders. The end-to-end check (a real Ray Train run leaves them) is in test_train.py and test_tune.py."""

from stal_ray.train.tensorboard import TensorBoardCallback, read_scalars, scalar_tags

REPORT = {"loss_total": 2.5, "loss_triplet_global": 1.0, "loss_softmax": 1.5, "iteration": 50, "epoch": 1,
          "lr": 0.01, "clips_per_s": 12.0, "data_wait_share": 0.25, "corrupt_frames": 0, "val_mAP": 0.5,
          "val_mAP_a0.3": 0.5, "val_alpha": 0.3, "note": "not a number", "done": False}


def test_report_metrics_become_sectioned_tags():
    tags = scalar_tags(REPORT)
    assert tags["loss/total"] == 2.5 and tags["loss/triplet_global"] == 1.0
    assert tags["train/lr"] == 0.01 and tags["train/clips_per_s"] == 12.0
    assert tags["train/data_wait_share"] == 0.25 and tags["val/mAP"] == 0.5 and tags["val/mAP_a0.3"] == 0.5
    left_out = {"iteration", "epoch", "train/iteration", "train/epoch", "train/note", "train/done"}
    assert not left_out & set(tags)


def test_every_report_is_a_point_at_its_iteration(tmp_path):
    callback = TensorBoardCallback(str(tmp_path / "run"))
    callback.after_report(None, [REPORT, {**REPORT, "val_mAP": 0.0}], checkpoint=None)  # rank 0 first
    callback.after_report(None, [{**REPORT, "iteration": 100, "loss_total": 1.0, "val_mAP": 0.75}], None)
    scalars = read_scalars(str(tmp_path / "run"))
    assert scalars["loss/total"] == [(50, 2.5), (100, 1.0)]
    assert scalars["val/mAP"] == [(50, 0.5), (100, 0.75)]
    assert scalars["train/clips_per_s"] == [(50, 12.0), (100, 12.0)]


def test_callback_pickles_without_its_writer(tmp_path):
    import pickle

    callback = TensorBoardCallback(str(tmp_path / "run"))
    callback.after_report(None, [REPORT], None)
    copy = pickle.loads(pickle.dumps(callback))  # Ray ships the callback to the Train controller
    assert copy._log is None and copy.run_dir == callback.run_dir


def test_events_reach_an_s3_run_folder(moto_server, make_bucket, tmp_path):
    from stal_ray.core import storage

    run_dir = f"{make_bucket()}/runs/r1"
    callback = TensorBoardCallback(run_dir, endpoint_url=moto_server)
    callback.after_report(None, [REPORT], None)
    callback.after_report(None, [{**REPORT, "iteration": 100}], None)
    fs, path = storage.filesystem(f"{run_dir}/tensorboard", endpoint_url=moto_server)
    names = fs.ls(path)
    assert len(names) == 1 and "events.out.tfevents" in names[0]
    local = tmp_path / "copy"
    (local / "tensorboard").mkdir(parents=True)
    fs.get_file(names[0], str(local / "tensorboard" / names[0].rsplit("/", 1)[1]))
    assert [step for step, _ in read_scalars(str(local))["loss/total"]] == [50, 100]


def test_a_storage_failure_warns_and_training_goes_on(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the run folder should be")
    callback = TensorBoardCallback(str(blocked / "run"))
    callback.after_report(None, [REPORT], None)  # no exception: the report is only not logged
    assert "TensorBoard events of iteration 50 not written" in caplog.text

"""The resume rule (docs/jobs.md#resuming): a run started again must have the settings of its config.yaml;
otherwise it is refused naming each setting that differs, unless the change is allowed, and then recorded in
config-changes.yaml, not silently overwritten."""

import pytest
import yaml

from stal_ray.config import ConfigError, load_config
from stal_ray.train.run_config import CHANGES_FILE, CONFIG_FILE, ChangedConfigError, record_config


def settings(*overrides):
    return load_config(None, ["train.iterations=200", "train.lr=0.01", *overrides]).to_dict()


def test_a_first_start_writes_config_yaml_and_the_same_settings_resume(tmp_path):
    record_config(str(tmp_path / "run"), settings())
    saved = yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())
    assert saved["train"]["iterations"] == 200
    record_config(str(tmp_path / "run"), settings())  # the same settings: a resume, nothing recorded
    assert not (tmp_path / "run" / CHANGES_FILE).exists()


def test_a_resume_with_other_settings_is_refused_naming_each_key(tmp_path):
    run = str(tmp_path / "run")
    record_config(run, settings())
    with pytest.raises(ChangedConfigError) as refused:
        record_config(run, settings("train.iterations=400", "train.lr=0.02", "eval.ranks=[1,5]"))
    assert isinstance(refused.value, ConfigError)  # the jobs print it in one line and exit 2
    message = str(refused.value)
    for change in ("train.iterations: 200 -> 400", "train.lr: 0.01 -> 0.02",
                   "eval.ranks: [1, 5, 10, 20] -> [1, 5]"):
        assert change in message, message
    assert "--allow-changed-config" in message
    # nothing was changed: the run keeps its settings
    assert yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())["train"]["iterations"] == 200
    assert not (tmp_path / "run" / CHANGES_FILE).exists()


def test_where_the_run_runs_is_not_a_change(tmp_path):
    run = str(tmp_path / "run")
    record_config(run, settings("train.num_workers=2"))
    record_config(run, settings("train.num_workers=1", "train.min_workers=1", "data.decode_concurrency=2"))
    assert not (tmp_path / "run" / CHANGES_FILE).exists()


def test_an_allowed_change_is_recorded_with_its_time_and_the_old_and_new_values(tmp_path, capsys):
    run = str(tmp_path / "run")
    record_config(run, settings())
    record_config(run, settings("train.iterations=400"), allow_changed=True)
    record_config(run, settings("train.iterations=600"), allow_changed=True)
    assert yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())["train"]["iterations"] == 600
    changes = yaml.safe_load((tmp_path / "run" / CHANGES_FILE).read_text())
    assert [entry["changed"] for entry in changes] == [
        {"train.iterations": {"saved": 200, "new": 400}}, {"train.iterations": {"saved": 400, "new": 600}}]
    assert all(entry["time"] for entry in changes)
    assert "train.iterations: 400 -> 600" in capsys.readouterr().out
    # and the run now resumes with its new settings without the flag
    record_config(run, settings("train.iterations=600"))

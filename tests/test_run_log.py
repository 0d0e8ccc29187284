"""The driver's log kept as log.txt in the run folder, on local disk and on S3: written once the folder
exists, appended to by a resumed run, copied while the job runs."""

import sys
import time

from stal_ray.core import storage
from stal_ray.core.run_log import LOG_FILE, run_log


def test_the_output_is_kept_in_the_run_folder_and_a_resumed_run_appends(tmp_path, capsys):
    run = tmp_path / "run"
    with run_log(str(run)) as target:
        print("refused before the run folder was written")
    assert target == str(run / LOG_FILE) and not run.exists()  # a refused job leaves nothing
    with run_log(str(run)):
        run.mkdir()
        print("iteration 10/100")
        print("train_mars: error: something", file=sys.stderr)
    with run_log(str(run)):
        print("resumed")
    assert (run / LOG_FILE).read_text().splitlines() == ["iteration 10/100", "train_mars: error: something",
                                                         "resumed"]
    assert "iteration 10/100" in capsys.readouterr().out  # still printed as before
    assert sys.stdout is not None and not hasattr(sys.stdout, "copy")


def test_on_s3_the_log_is_uploaded_while_the_job_runs(make_bucket, moto_server):
    bucket = make_bucket()
    run = f"{bucket}/ray_results/mars-r50"
    fs, path = storage.filesystem(run, endpoint_url=moto_server)
    with run_log(run, endpoint_url=moto_server, every_s=0.2) as target:
        fs.pipe_file(f"{path}/config.yaml", b"{}")  # the run folder now exists
        print("extraction: 10 of 100 frames (10%)")
        deadline = time.monotonic() + 10
        while not fs.exists(f"{path}/{LOG_FILE}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fs.cat_file(f"{path}/{LOG_FILE}") == b"extraction: 10 of 100 frames (10%)\n"
        print("done")
    assert target == f"{run}/{LOG_FILE}"
    assert fs.cat_file(f"{path}/{LOG_FILE}").decode().splitlines()[-1] == "done"

"""An interrupted conversion goes on where it stopped when run again, to the same bytes as one
that never stopped; one whose inputs or options changed is refused, and --overwrite starts over."""
import json
import os
import subprocess
import sys

import pytest

from megatron_patch.data import convert_progress, shard_writer
from megatron_patch.data.convert_cli import main as convert_main
from test_data_convert import image_bytes, turn, write
from trainer_runs import subprocess_env

# Dies (os._exit: no cleanup, unflushed buffers lost, as kill -9) at the N-th call of one
# function of the converter, before or after it runs, then the same command goes on.
DIE_AT = """
import os, sys
from megatron_patch.data import convert, convert_progress, shard_writer
from megatron_patch.data.convert_cli import main
owner_name, function_name = sys.argv[1].rsplit(".", 1)
owner = {"ShardTar": shard_writer._ShardTar, "progress": convert_progress, "convert": convert,
         "os": os}[owner_name]
target, moment, calls = int(sys.argv[2]), sys.argv[3], [0]
original = getattr(owner, function_name)
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == target and moment == "before":
        os._exit(9)
    result = original(*args, **kwargs)
    if calls[0] == target and moment == "after":
        os._exit(9)
    return result
setattr(owner, function_name, dying)
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture
def mixed_input(tmp_path):
    """14 records over 3 splits and 2-sample shards, two of them bad (a missing image and no
    answer), so every kind of file changes on the way."""
    root = tmp_path / "imgs"
    write(str(root / "a.png"), image_bytes((200, 10, 10)))
    write(str(root / "b.jpg"), image_bytes((10, 200, 10), (40, 30), "JPEG"))
    records = []
    for index in range(14):
        record = {"id": f"r{index}", "image": ["a.png", "b.jpg"][index % 2],
                  "conversations": [turn("human", f"<image>\nQuestion {index}?"),
                                    turn("gpt", f"answer {index}")]}
        if index == 4:
            record["image"] = "missing.png"
        if index == 9:
            record["conversations"] = record["conversations"][:1]
        records.append(record)
    path = write(str(tmp_path / "data.json"), json.dumps(records, indent=1))
    return [path, "--image-root", str(root), "--split", "50,30,20", "--max-samples-per-shard",
            "2", "--commit-interval", "0", "--workers", "1", "--no-progress"]


def output_files(out_dir) -> dict:
    """Every file a conversion publishes, by name, except energon's sqlite index and uuid (made by
    energon, with its own ids) and the report's timings."""
    files = {}
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.endswith((".tar", ".tar.idx")) or name == "skipped.jsonl":
            files[name] = open(path, "rb").read()
    files["manifest"] = open(os.path.join(out_dir, ".nv-meta", "llava_manifest.json")).read()
    report = json.load(open(os.path.join(out_dir, "conversion_report.json")))
    files["report"] = {k: v for k, v in report.items()
                       if k not in ("seconds", "samples_per_second", "megabytes_per_second")}
    return files


@pytest.fixture
def uninterrupted(mixed_input, tmp_path):
    out = str(tmp_path / "uninterrupted")
    assert convert_main(mixed_input + ["--output-dir", out]) == 3
    files = output_files(out)
    assert len([n for n in files if n.endswith(".tar")]) == 6  # 12 samples: 3 + 2 + 1 shards
    assert files["report"]["skipped"] == 2
    return files


@pytest.mark.parametrize("function, call, moment", [
    ("ShardTar.write", 1, "before"),      # before any sample: only the first point exists
    ("ShardTar.write", 5, "after"),       # a sample written (in a buffer) but not committed
    ("ShardTar.close", 2, "after"),       # a shard just closed, its next not yet started
    ("progress.save", 8, "before"),       # everything flushed, the point not yet replaced
    ("progress.save", 15, "after"),       # the last record's point
    ("progress.save", 16, "after"),       # the point after the last: only publishing is left
    ("os.replace", 18, "after"),          # publishing: 2 of the 6 shards moved (16 points before)
    ("convert.write_energon_index", 1, "before"),  # every shard published, no index
])
def test_a_conversion_killed_anywhere_goes_on_to_the_same_bytes(function, call, moment,
                                                               mixed_input, uninterrupted,
                                                               tmp_path, capsys):
    out = str(tmp_path / "out")
    command = mixed_input + ["--output-dir", out]
    died = subprocess.run([sys.executable, "-c", DIE_AT, function, str(call), moment, *command],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert died.returncode == 9, died.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, ".nv-meta"))
    assert convert_main(command) == 3
    assert "going on with the interrupted conversion" in capsys.readouterr().err
    assert output_files(out) == uninterrupted
    assert not os.path.exists(os.path.join(out, shard_writer.STAGING_DIR))


def interrupt(command, monkeypatch, after_samples: int) -> None:
    """Stops a conversion in-process with an error after `after_samples` samples."""
    write_sample, calls = shard_writer._ShardTar.write, []

    def failing(self, key, parts):
        if len(calls) == after_samples:
            raise KeyboardInterrupt
        calls.append(key)
        write_sample(self, key, parts)

    monkeypatch.setattr(shard_writer._ShardTar, "write", failing)
    assert convert_main(command) == 130  # Ctrl-C: says the same command goes on
    monkeypatch.undo()


def test_changed_inputs_or_options_are_refused_and_overwrite_starts_over(
        mixed_input, uninterrupted, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    command = mixed_input + ["--output-dir", out]
    interrupt(command, monkeypatch, after_samples=6)
    capsys.readouterr()

    other_options = [a if a != "50,30,20" else "60,40" for a in command]
    assert convert_main(other_options) == 1
    error = capsys.readouterr().err
    assert "interrupted conversion of other inputs or options" in error
    assert "split was [50.0, 30.0, 20.0], now [60.0, 40.0]" in error and "--overwrite" in error

    with open(mixed_input[0], "a") as handle:
        handle.write("\n")  # same records, but the file is not the one that was converted
    assert convert_main(command) == 1
    assert f"{mixed_input[0]} changed since" in capsys.readouterr().err

    assert convert_main(command + ["--overwrite"]) == 3
    assert output_files(out) == uninterrupted  # the same records: the same shards


def test_a_file_rewritten_in_a_folder_input_is_refused(tmp_path, monkeypatch, capsys):
    """A folder's own mtime does not change when one of its files is rewritten in place; the
    resume point must notice anyway (else the rerun would mix old and new samples)."""
    folder = tmp_path / "samples"
    for index in range(6):
        write(str(folder / f"s{index}.png"), image_bytes((10 * index, 100, 100)))
        write(str(folder / f"s{index}.json"), json.dumps(
            {"id": f"s{index}", "conversations": [turn("human", f"<image>\nWhich {index}?"),
                                                  turn("gpt", f"this {index}")]}))

    def command(out):
        return [str(folder), "--output-dir", str(tmp_path / out), "--max-samples-per-shard",
                "2", "--commit-interval", "0", "--workers", "1", "--no-progress"]

    interrupt(command("unchanged"), monkeypatch, after_samples=3)
    assert convert_main(command("unchanged")) == 0  # the same folder goes on
    interrupt(command("out"), monkeypatch, after_samples=3)
    capsys.readouterr()

    folder_times = os.stat(folder)
    edited = folder / "s5.json"
    edited.write_text(edited.read_text().replace("this 5", "that 5"))
    os.utime(folder, ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))
    assert convert_main(command("out")) == 1
    assert f"{folder} changed since" in capsys.readouterr().err


def test_a_missing_staging_shard_is_named(mixed_input, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    command = mixed_input + ["--output-dir", out]
    interrupt(command, monkeypatch, after_samples=6)
    staging = os.path.join(out, shard_writer.STAGING_DIR)
    with open(os.path.join(staging, convert_progress.PROGRESS_NAME)) as handle:
        first_closed = json.load(handle)["writer"]["closed"]["train"][0]["name"]
    os.remove(os.path.join(staging, first_closed))
    capsys.readouterr()
    assert convert_main(command) == 1
    error = capsys.readouterr().err
    assert f"{os.path.join(staging, first_closed)} is missing or shorter" in error
    assert "--overwrite to start over" in error


def test_ctrl_c_then_the_same_command_goes_on(mixed_input, uninterrupted, tmp_path, monkeypatch):
    """A KeyboardInterrupt runs the converter's cleanup (open files closed, their buffers
    written past the last point) before the next run cuts them back."""
    out = str(tmp_path / "out")
    command = mixed_input + ["--output-dir", out, "--commit-interval", "3600"]  # first point only
    interrupt(command, monkeypatch, after_samples=7)
    assert convert_main(command) == 3
    assert output_files(out) == uninterrupted


def test_an_unreadable_resume_point_is_named(mixed_input, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    command = mixed_input + ["--output-dir", out]
    interrupt(command, monkeypatch, after_samples=3)
    progress = os.path.join(out, shard_writer.STAGING_DIR, convert_progress.PROGRESS_NAME)
    write(progress, "{not json")
    capsys.readouterr()
    assert convert_main(command) == 1
    error = capsys.readouterr().err
    assert f"cannot read {progress} (JSONDecodeError" in error and "--overwrite" in error
    assert convert_main(command + ["--overwrite"]) == 3


def test_a_dead_worker_is_an_error_that_says_how_to_go_on(mixed_input, uninterrupted, tmp_path,
                                                          monkeypatch, capsys):
    """A worker process that dies (ordered_pool.WorkerDied, here after 7 results) ends the run
    with a message naming the record, the output folder and the way on; the same command then
    finishes with the bytes of a run that never stopped."""
    from megatron_patch.data import convert
    from megatron_patch.data.ordered_pool import WorkerDied

    class DiesAfterSeven:
        def __init__(self, function, workers, **kwargs):
            self.function = function

        def map(self, items):
            for done, item in enumerate(items):
                if done == 7:
                    raise WorkerDied("a worker process died (killed, ...) after 7 results")
                yield self.function(item)

        def __exit__(self, *exc):
            pass

    out = str(tmp_path / "out")
    command = [a if a != "1" else "2" for a in mixed_input] + ["--output-dir", out]
    assert command[command.index("--workers") + 1] == "2"
    monkeypatch.setattr(convert, "OrderedProcessMap", DiesAfterSeven)
    capsys.readouterr()
    assert convert_main(command) == 1
    message = capsys.readouterr().err
    assert "worker process died" in message and "record 8 of the input" in message
    assert out in message and "run the same command again" in message
    monkeypatch.undo()
    assert convert_main(command) == 3
    assert "going on with the interrupted conversion" in capsys.readouterr().err
    assert output_files(out) == uninterrupted

"""Writers (flaxdose.io): a folder or file appears whole or not at all. Staging left by a killed writer
(`kill -9`) names its owner and is removed by the next writer of the same target when that owner is dead
(never a live writer's, another host's, another target's or a name of another pattern); --overwrite swaps
through renames that an interruption cannot leave half done, and never deletes a training run or a file;
finished folders and files get the umask's mode.

Expected names are built here from the documented pattern `.NAME.staging.HOST.PID.RANDOM`, the
host's name and the pids of processes this test started; expected counts from the exports written."""

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import dicom_factory as F
import numpy as np
import pytest
from conftest import tiny_config
from flaxdose.launch import paper_study

from flaxdose.data import Dataset
from flaxdose.data.case import Case
from flaxdose.dicom import import_dicom
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_folder, atomic_write_text, require_folder
from flaxdose.training import trainer

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())



@pytest.fixture
def pids():
    """(dead pid, live pid): a finished (reaped) child, and a `sleep` that runs until the test ends."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen(["sleep", "600"])
    yield done.pid, live.pid
    live.kill()
    live.wait()


def leftovers(parent, name, dead, live):
    """A dead and a live writer's staging of `name`, plus names that must never be touched."""
    made = {
        "dead": parent / f".{name}.staging.{HOST}.{dead}.0123abcd",
        "dead_file": parent / f".{name}.staging.{HOST}.{dead}.89abcdef",
        "live": parent / f".{name}.staging.{HOST}.{live}.0123abcd",
        "other_host": parent / f".{name}.staging.{HOST}x.{dead}.0123abcd",
        "other_target": parent / f".{name}2.staging.{HOST}.{dead}.0123abcd",
        "old_pattern": parent / f".{name}.mdiwlqh0.tmp",
        "not_hex": parent / f".{name}.staging.{HOST}.{dead}.0123abcz",
    }
    for key, path in made.items():
        if key == "dead_file":
            path.write_text("half a file")
        else:
            path.mkdir()
            (path / "case_x.npz").write_bytes(b"patient volume")
    # a dead writer's nested staging (write_dataset inside atomic_folder): named after its folder
    nested = parent / f".{made['dead'].name}.staging.{HOST}.{dead}.fedcba98"
    nested.mkdir()
    made["dead_nested"] = nested
    return made


def test_a_writer_removes_only_dead_writers_staging_of_its_target(tmp_path, pids, caplog):
    dead, live = pids
    made = leftovers(tmp_path, "k1", dead, live)
    with caplog.at_level(logging.INFO, logger="flaxdose"):
        with atomic_folder(tmp_path / "k1") as tmp:
            assert re.fullmatch(rf"\.k1\.staging\.{re.escape(HOST)}\.{os.getpid()}\.[0-9a-f]{{8}}", tmp.name)
            (tmp / "a.txt").write_text("new")
    gone = {"dead", "dead_file", "dead_nested"}
    for key, path in made.items():
        assert path.exists() == (key not in gone), key
    assert (tmp_path / "k1" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "k1").iterdir()) == ["a.txt"]
    lines = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(lines) == 1 and "3 staging" in lines[0]
    assert all(made[k].name in lines[0] for k in gone)


def test_file_writers_sweep_their_own_target(tmp_path, pids):
    dead, live = pids
    for name in ("summary.md", "case_1.npz"):
        made = leftovers(tmp_path, name, dead, live)
        if name == "summary.md":
            atomic_write_text(tmp_path / name, "# done\n")
            assert (tmp_path / name).read_text() == "# done\n"
        else:
            dose = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
            Case("c1", ("PTV",), np.ones((1, 2, 3, 4), bool), dose, (2.0, 2.0, 2.0)).save(tmp_path / name)
            np.testing.assert_array_equal(Case.load(tmp_path / name).dose, dose)
        assert not made["dead"].exists() and not made["dead_file"].exists() and not made["dead_nested"].exists()
        assert made["live"].exists() and made["other_host"].exists() and made["old_pattern"].exists()
        shutil.rmtree(made["live"])  # the next name's leftovers start clean


def test_kill_9_leftovers_are_removed_by_the_next_writer(tmp_path):
    """A real `kill -9` inside atomic_folder: its staging (holding a file) remains, then goes."""
    code = ("import sys, time\nfrom flaxdose.io import atomic_folder\n"
            f"with atomic_folder({str(tmp_path / 'out')!r}) as tmp:\n"
            "    (tmp / 'case_1.npz').write_bytes(b'volume')\n"
            "    print(tmp.name, flush=True)\n    time.sleep(600)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    staged = writer.stdout.readline().strip()
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    assert staged == f".out.staging.{HOST}.{writer.pid}.{staged[-8:]}"
    assert (tmp_path / staged / "case_1.npz").exists() and not (tmp_path / "out").exists()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_import_after_a_killed_import_cleans_its_staging_and_writes_the_dataset(rt_export, tmp_path, pids):
    dead, live = pids
    src = tmp_path / "src"
    shutil.copytree(rt_export["folder"], src / "p")
    made = leftovers(tmp_path, "ds", dead, live)
    summary = import_dicom(src, tmp_path / "ds", F.STRUCTURES, "dose", progress=False)
    assert len(summary.case_ids) == 1 and not summary.failures
    ds = Dataset.open(tmp_path / "ds")
    assert ds.manifest["num_cases"] == 1 and sorted(p.name for p in (tmp_path / "ds").glob("cases/*")) == [
        f"{summary.case_ids[0]}.npz"]
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = sorted(["ds", "src"] + [made[k].name for k in made if k not in {"dead", "dead_file", "dead_nested"}])
    assert left == expected  # the live writer's, and names of other patterns, kept


# ---------------------------------------------------------------- the finished mode
def test_finished_folders_and_files_get_the_umasks_mode(tmp_path):
    """Staging is private while written; the published dataset / file is readable as a plain mkdir's."""
    from flaxdose.io import atomic_folder, atomic_write_text

    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "ds") as staging:
            (staging / "a.txt").write_text("x")
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "ds").stat().st_mode & 0o777 == 0o755  # 0o777 & ~0o022
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644  # 0o666 & ~0o022


# ---------------------------------------------------------------- --overwrite
def _fill(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(f"{text} {name}")


def _contents(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_overwrite_interrupted_between_the_two_renames_keeps_one_complete_copy(tmp_path, monkeypatch, pids):
    """--overwrite swaps through renames (issue 30): a Ctrl-C between 'old -> parked' and 'new -> final'
    puts the old folder back; a writer killed there (kill -9: no handler runs) leaves the parked old copy,
    which the next writer renames back before it writes."""
    import flaxdose.io as io

    root = tmp_path / "out"
    _fill(root, "old")
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        if len(calls) == 2:  # the second rename: the new folder into place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_folder(root, overwrite=True) as tmp:
        _fill(tmp, "new")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert calls[0][0] == "out" and ".out.previous." in calls[0][1] and calls[1][1] == "out"
    assert _contents(root) == {"a.txt": "old a.txt", "b.txt": "old b.txt"}  # the old copy, complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing else left behind

    # killed between the renames: simulate with a parked copy owned by a dead process, no target
    dead, _ = pids
    root.rename(tmp_path / f".out.previous.{HOST}.{dead}.0123abcd")
    (tmp_path / f".out.staging.{HOST}.{dead}.89abcdef").mkdir()  # its finished new copy, never renamed in
    assert not root.exists()
    with atomic_folder(root, overwrite=True) as tmp:
        assert _contents(root) == {"a.txt": "old a.txt", "b.txt": "old b.txt"}  # restored before writing
        _fill(tmp, "newer")
    assert _contents(root) == {"a.txt": "newer a.txt", "b.txt": "newer b.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # killed after the second rename: the parked old copy is removed, the target kept
    _fill(tmp_path / f".out.previous.{HOST}.{dead}.0123abcd", "old")
    atomic_write_text(tmp_path / "other.txt", "x")  # another target's writer touches nothing
    with atomic_folder(root, overwrite=True) as tmp:
        assert _contents(root)["a.txt"] == "newer a.txt"
        _fill(tmp, "newest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "out"]
    assert _contents(root)["b.txt"] == "newest b.txt"


def test_overwrite_never_deletes_a_training_run_or_a_file(tmp_path):
    """--overwrite replaces an earlier output; a file, a training workdir, a folder holding one or a folder
    inside one is refused, and left as it was."""
    from flaxdose.io import atomic_folder

    run = tmp_path / "runs" / "quick"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "data" / "ds").mkdir(parents=True)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, why in [(run, "is the training run"), (tmp_path / "runs", "holds the training run"),
                     (run / "data" / "ds", "lies inside the training run"), (a_file, "is a file"),
                     (run / "..", f"{run.parent.resolve()} holds the training run")]:  # named as resolved
        with pytest.raises(FlaxdoseError, match=why):
            with atomic_folder(out, overwrite=True):
                pass
    assert (run / "config.json").read_text() == "{}" and a_file.read_text() == "mine"
    earlier = tmp_path / "eval"
    (earlier / "old.csv").parent.mkdir()
    (earlier / "old.csv").write_text("x")
    with atomic_folder(earlier, overwrite=True) as tmp:  # an earlier output is replaced
        (tmp / "new.csv").write_text("y")
    assert sorted(p.name for p in earlier.iterdir()) == ["new.csv"]


def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(tmp_path):
    """--overwrite deleted whatever the --out folder held (a new user's precious.txt went with exit 0): it replaces
    an earlier output of the same kind (recognised by the file that command always writes) or an empty folder; any
    other folder is refused, naming the folder, its files and the fix, and is left as it was."""
    from flaxdose import io
    from flaxdose.data.case import MANIFEST
    from flaxdose.inference.dicom_plans import SUMMARY_CSV
    from flaxdose.run import PACKAGE_METADATA

    # the markers are the files the writers name
    assert io.OUTPUT_KINDS["dataset"]["needs"] == (MANIFEST,)
    assert io.OUTPUT_KINDS["model package"]["needs"] == (PACKAGE_METADATA,)
    assert io.OUTPUT_KINDS["dicom predictions"]["needs"] == (SUMMARY_CSV,)
    earlier = {"dataset": ["manifest.json", "cases"], "model package": ["flaxdose_model.json", "params.npz"],
               "evaluation": ["summary.json", "report.md", "cases.csv"], "qa": ["calibration.json"],
               "assessment": ["assessment.json", "report.md"], "dicom predictions": ["summary.csv", "plan_01"]}
    assert sorted(earlier) == sorted(io.OUTPUT_KINDS)
    for kind, names in earlier.items():
        stranger = tmp_path / f"stranger_{kind.replace(' ', '_')}"
        stranger.mkdir()
        (stranger / "precious.txt").write_text("hi")
        with pytest.raises(FlaxdoseError) as info:
            with atomic_folder(stranger, overwrite=True, kind=kind):
                pass
        message = str(info.value)
        assert str(stranger) in message and "precious.txt" in message, message
        assert "choose another --out, or empty the folder yourself" in message
        assert [p.name for p in stranger.iterdir()] == ["precious.txt"] and (stranger / "precious.txt").read_text() == "hi"

        out = tmp_path / f"earlier_{kind.replace(' ', '_')}"  # an earlier output of the same command: replaced
        out.mkdir()
        for name in names:
            (out / name).write_text("old") if "." in name else (out / name).mkdir()
        assert io.output_kind(out) == kind
        for other in set(earlier) - {kind}:  # another command's output is not this one's to delete
            with pytest.raises(FlaxdoseError, match=f"is an? {io.OUTPUT_KINDS[kind]['what']}, not an earlier"):
                io.check_writable(out, True, other)
        with atomic_folder(out, overwrite=True, kind=kind) as tmp:
            (tmp / names[0]).write_text("new")
        assert [p.name for p in out.iterdir()] == [names[0]] and (out / names[0]).read_text() == "new"

        empty = tmp_path / f"empty_{kind.replace(' ', '_')}"  # an empty folder: fine, with or without --overwrite
        for overwrite in (False, True):
            empty.mkdir(exist_ok=True)
            with atomic_folder(empty, overwrite=overwrite, kind=kind) as tmp:
                (tmp / names[0]).write_text("made")
            assert (empty / names[0]).read_text() == "made"
            shutil.rmtree(empty)
    # without --overwrite a non-empty folder is refused as before, an earlier output included
    with pytest.raises(FlaxdoseError, match="already holds files; choose an empty folder or pass --overwrite"):
        io.check_writable(tmp_path / "earlier_qa", False, "qa")


def test_overwrite_of_a_dataset_refuses_a_strangers_folder_before_writing(tmp_path):
    """write_dataset (synth, import_dicom, convert_openkbp, predict) with overwrite: a folder of someone else's
    files is refused, before any case is read; an earlier dataset is replaced."""
    from flaxdose.data import write_dataset

    def cases():
        raise AssertionError("no case is read for a refused folder")
        yield

    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("hi")
    with pytest.raises(FlaxdoseError, match=r"is not an earlier flaxdose dataset \(it has no manifest.json\)"):
        write_dataset(out, cases(), {}, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


def test_a_file_where_a_run_or_study_folder_goes_is_named_as_one(tmp_path):
    """train --workdir, a study's --workdir, synth --study: a file in the way is one error naming it (it was the
    OS's 'Not a directory: .../data' or 'File exists'), before anything is written."""
    afile = tmp_path / "afile"
    afile.write_text("notes")
    assert require_folder(tmp_path / "new") == tmp_path / "new" and require_folder(tmp_path) == tmp_path
    for call in (lambda: trainer.train_and_evaluate(tiny_config(), afile),
                 lambda: paper_study.run_study("smoke", afile, tmp_path / "report")):
        with pytest.raises(FlaxdoseError, match=r"--workdir .*afile is a file, not a folder"):
            call()
    assert afile.read_text() == "notes" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

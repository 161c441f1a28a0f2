"""Result and state files survive interruptions and bad content: atomic writes, torn journal lines,
corrupt caches, folders owned by one command, and no pickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from accel import io


def test_a_corrupt_stored_image_file_is_measured_again_with_a_message(tmp_path, capsys):
    from accel.lab.records import RecordStore

    store = RecordStore(tmp_path / ".reference-cache")
    store.add({"fingerprint": "key", "flops": 123}, torch.ones(2, 1, 4, 4))
    assert torch.equal(RecordStore(store.folder).images("key"), torch.ones(2, 1, 4, 4))
    path = store.image_path("key")
    path.write_bytes(path.read_bytes()[:40])  # cut short
    assert RecordStore(store.folder).images("key") is None and str(path) in capsys.readouterr().err
    store.add({"fingerprint": "key", "flops": 123}, torch.ones(2, 1, 4, 4))  # the rebuilt file is read back
    assert torch.equal(RecordStore(store.folder).images("key"), torch.ones(2, 1, 4, 4))


def test_a_record_whose_images_are_missing_is_not_reused(tmp_path):
    from accel.lab.records import RecordStore

    store = RecordStore(tmp_path)
    store.add({"fingerprint": "key", "psnr": 30.0}, torch.zeros(1, 1, 2, 2))
    store.image_path("key").unlink()
    assert RecordStore(tmp_path).get("key") is None
    store.add({"fingerprint": "bare", "psnr": 31.0})  # a record without images needs none
    assert RecordStore(tmp_path).get("bare")["psnr"] == 31.0


def test_atomic_writes_keep_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "summary.json"
    io.write_json(path, {"a": 1})

    def interrupted(temporary: Path) -> None:
        temporary.write_text('{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(path, interrupted)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left over
    io.save_safetensors(tmp_path / "x.safetensors", {"images": torch.arange(4.0)}, metadata={"flops": "7"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"flops": "7"} and handle.get_tensor("images").tolist() == [0, 1, 2, 3]


def test_a_torn_last_line_is_skipped_with_a_message_and_appends_continue(tmp_path, capsys):
    path = tmp_path / "cells.rank0.jsonl"
    io.append_jsonl(path, {"key": "a"})
    with open(path, "a") as handle:
        handle.write('{"key": "b", "psn')  # the interruption
    assert io.read_jsonl(path) == [{"key": "a"}]
    assert f"line 2 of {path}" in capsys.readouterr().err
    io.append_jsonl(path, {"key": "c"})  # starts a line of its own
    assert io.read_jsonl(path) == [{"key": "a"}, {"key": "c"}]


def test_the_record_store_skips_a_torn_last_line(tmp_path, capsys):
    from accel.lab.records import RecordStore as LabRecords

    store = LabRecords(tmp_path / "abl")
    store.add({"fingerprint": "k1", "psnr": 30.0}, torch.zeros(1, 1, 2, 2))
    with open(tmp_path / "abl" / "records.rank0.jsonl", "a") as handle:
        handle.write('{"fingerprint": "k2", "ps')
    reopened = LabRecords(tmp_path / "abl")
    assert list(reopened.records()) == ["k1"] and "records.rank0.jsonl" in capsys.readouterr().err
    assert reopened.get("k1")["psnr"] == 30.0 and reopened.images("k1").shape == (1, 1, 2, 2)


def test_a_folder_belongs_to_the_command_that_wrote_it(tmp_path):
    folder = tmp_path / "runs" / "x"
    io.claim_folder(folder, "accel ablate")
    io.claim_folder(folder, "accel ablate")  # the same command may write it again (resume)
    with pytest.raises(io.FolderClaimedError, match="holds the results of `accel ablate`; `accel run` will not"):
        io.claim_folder(folder, "accel run")
    assert (folder / io.MARKER).read_text() == "accel ablate\n"


def test_result_files_are_readable_like_any_file_the_user_writes(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = io.write_json(tmp_path / "summary.json", {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_a_torn_loss_row_is_skipped_with_a_message_naming_the_file(tmp_path, capsys):
    from distill.training.loss_log import read_loss_log

    path = tmp_path / "loss.csv"
    path.write_text("step,loss,lr,seconds\n0,1.5,0.001,0.10\n1,1.6513,0.00055,\n")
    assert read_loss_log(path) == [(0, 1.5, 0.001, 0.1)]
    assert f"line 3 of {path}" in capsys.readouterr().err
    path.write_text("step,loss,lr,seconds\n0,1.5,0.001,0.10\n\x00\x00\n")  # a NUL tail: dropped quietly
    assert read_loss_log(path) == [(0, 1.5, 0.001, 0.1)] and capsys.readouterr().err == ""


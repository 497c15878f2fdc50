from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from skysense.commands import datasets as command

from data_helpers import real_dataset_dir, write_tif


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


def test_list_json(capsys):
    assert _run(["datasets", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"aid", "oscd", "bigearthnet_v1", "eurosat_ms", "levir_cd"} <= {r["name"] for r in rows}


def test_check_reports_each_error_by_file(tmp_path, capsys):
    for folder in ("A", "B", "label"):
        write_tif(tmp_path / folder / "train_1.png", np.zeros((1 if folder == "label" else 3, 8, 8), np.uint8), crs=None)
    bad = tmp_path / "A" / "test_2.png"
    bad.write_bytes(b"truncated")
    assert _run(["datasets", "check", "levir_cd", "--data-root", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == {"test": 1, "train": 1} and report["read"] == {"train": 1}
    assert len(report["errors"]) == 1 and str(bad) in report["errors"][0]["error"]


@pytest.mark.real_data
def test_check_real_eurosat(real_root, capsys):
    root = real_dataset_dir(real_root, "samples/eurosat_ms")
    assert _run(["datasets", "check", "eurosat_ms", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "(1, 10, 64, 64) x3" in out and "errors: 0" in out

"""`export-hf --overwrite` deletes only what an export wrote (issue 20): a run directory, a file, or a directory
holding anything else is refused before the export starts; a previous export is replaced by one rename and only
its own files are removed. File level (no model): the export's output guard and its install step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.export_hf import (
    EXPORT_MARKER,
    ExportError,
    check_output,
    export_hf,
    install_output,
    write_marker,
)

pytestmark = pytest.mark.reliability


def _run_dir(root: Path) -> Path:
    """What `foldtron train` leaves: stage directories with iteration checkpoints and `latest`."""
    run = root / "run"
    for stage, it in (("phase1", 10), ("long_context", 20)):
        d = run / stage / f"iter_{it:07d}"
        d.mkdir(parents=True)
        (d / ".metadata").write_bytes(b"meta")
        (d / "__0_0.distcp").write_bytes(b"\0" * 64)
        (d / "foldtron.json").write_text(json.dumps({"iteration": it, "stage": stage}))
        (run / stage / "latest").write_text(d.name + "\n")
    (run / "config.yaml").write_text("model: tiny\n")
    return run


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _export(root: Path, name: str, files: dict) -> Path:
    """A finished export in a temp dir, as export_hf leaves it before install_output."""
    tmp = root / f".{name}.tmp-1"
    tmp.mkdir()
    for f, data in files.items():
        (tmp / f).write_bytes(data)
    write_marker(tmp, {"kind": "hf"})
    return tmp


def test_overwrite_pointed_at_a_run_directory_deletes_nothing(tmp_path, capsys):
    run = _run_dir(tmp_path)
    before = _snapshot(run)
    with pytest.raises(ExportError, match=rf"{run}.*not a Foldtron export.*even with --overwrite"):
        export_hf(run / "long_context", run, overwrite=True)
    assert _snapshot(run) == before
    # the same through the command line
    from pretrain.cli import main

    assert main(["export-hf", "--checkpoint", str(run / "long_context"), "--output", str(run), "--overwrite"]) == 2
    assert f"foldtron export-hf: output {run} exists and is not a Foldtron export" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_output_naming_a_file_fails_before_exporting(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    # the checkpoint does not even exist: the output is checked first
    with pytest.raises(ExportError, match=rf"output {f} is a file"):
        export_hf(tmp_path / "no-such-checkpoint", f, overwrite=True)
    with pytest.raises(ExportError, match=rf"{f} is a file"):
        export_hf(tmp_path / "no-such-checkpoint", f / "hf")
    assert f.read_bytes() == b"x"


def test_nvfp4_output_checked_before_the_first_export(tmp_path, capsys):
    from pretrain.cli import main

    run = _run_dir(tmp_path)
    assert main(["export-hf", "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "hf"),
                 "--nvfp4", str(run), "--overwrite"]) == 2
    assert f"output {run} exists and is not a Foldtron export" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_overwrite_refuses_a_previous_export_with_foreign_files(tmp_path):
    out = tmp_path / "hf"
    install_output(_export(tmp_path, "hf", {"config.json": b"{}", "model-00001-of-00001.safetensors": b"a"}),
                   out, overwrite=False)
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    with pytest.raises(ExportError, match=r"files no export wrote \(eval/, notes\.txt\)"):
        check_output(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="pass --overwrite"):
        check_output(out, overwrite=False)


def test_overwrite_replaces_a_previous_export_and_removes_only_its_files(tmp_path):
    out = tmp_path / "hf"
    first = {"config.json": b"1", "model-00001-of-00002.safetensors": b"a", "model-00002-of-00002.safetensors": b"b"}
    install_output(_export(tmp_path, "hf", first), out, overwrite=False)
    assert json.loads((out / EXPORT_MARKER).read_text())["files"] == sorted(first)
    check_output(out, overwrite=True)
    second = {"config.json": b"2", "model-00001-of-00001.safetensors": b"c"}
    install_output(_export(tmp_path, "hf", second), out, overwrite=True)
    assert _snapshot(out) == {**second, EXPORT_MARKER: (out / EXPORT_MARKER).read_bytes()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or old directory left


def test_install_rechecks_a_directory_changed_during_the_export(tmp_path):
    out = tmp_path / "hf"
    install_output(_export(tmp_path, "hf", {"config.json": b"1"}), out, overwrite=False)
    check_output(out, overwrite=True)
    (out / "added-meanwhile.txt").write_text("x")  # a user's file appears while the export runs
    tmp = _export(tmp_path, "hf2", {"config.json": b"2"})
    with pytest.raises(ExportError, match="added-meanwhile"):
        install_output(tmp, out, overwrite=True)
    assert (out / "added-meanwhile.txt").read_text() == "x" and (out / "config.json").read_bytes() == b"1"


def test_legacy_export_without_file_list_is_recognised(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for f in ("config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json"):
        (out / f).write_bytes(b"x")
    (out / EXPORT_MARKER).write_text(json.dumps({"checkpoint": "x"}))
    check_output(out, overwrite=True)
    (out / "iter_0000010").mkdir()
    (out / "iter_0000010" / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"iter_0000010/__0_0\.distcp"):
        check_output(out, overwrite=True)


def test_import_hf_refuses_a_stage_with_trained_checkpoints(tmp_path):
    """`import-hf --output RUN --stage phase1 --overwrite` on a trained run would reset phase1's `latest` to the
    import (and replace RUN/tokenizer.json): refused before the HF directory is read."""
    from pretrain.import_hf import import_hf

    run = _run_dir(tmp_path)
    (run / "phase1" / "iter_0000000").mkdir()
    (run / "phase1" / "iter_0000000" / "foldtron.json").write_text(json.dumps({"iteration": 0, "stage": "phase1"}))
    before = _snapshot(run)
    with pytest.raises(ExportError, match=r"iter_0000000 is not a previous import"):
        import_hf(tmp_path / "no-such-hf", run, stage="phase1", overwrite=True)
    (run / "phase1" / "iter_0000000" / "foldtron.json").write_text(json.dumps(
        {"iteration": 0, "weights_only": True, "source": "/x"}))
    before = _snapshot(run)
    with pytest.raises(ExportError, match=r"phase1 already holds iter_0000010"):
        import_hf(tmp_path / "no-such-hf", run, stage="phase1", overwrite=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{new}")
    (run / "tokenizer.json").write_text("{mine}")
    with pytest.raises(ExportError, match=r"tokenizer\.json exists and differs"):
        import_hf(hf, run, stage="pretrained")
    assert _snapshot(run) == {**before, "tokenizer.json": b"{mine}"}

"""Edges of the newer features (issue 30): refused at start-up with a message that names the fix,
and output that says what happened. Each test failed before its fix."""

from __future__ import annotations

from lowmem.cli import main as cli_main


def test_a_plugin_that_raises_on_import_exits_2_naming_its_file_and_line(tmp_path, capsys):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import math\n\nraise RuntimeError('half-written plugin')\n")
    code = cli_main(["train", "--plugin", str(plugin), "--list-optimizers"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{plugin}, line 3" in err and "RuntimeError: half-written plugin" in err
    assert "Traceback" not in err


def test_a_plugin_with_a_syntax_error_names_the_line(tmp_path, capsys):
    plugin = tmp_path / "typo_plugin.py"
    plugin.write_text("x = 1\ndef f(:\n    pass\n")
    code = cli_main(["train", "--plugin", str(plugin), "--list-optimizers"])
    err = capsys.readouterr().err
    assert code == 2 and f"{plugin}, line 2" in err and "SyntaxError" in err


def _first_document_error(path):
    from lowmem.data import open_source
    from lowmem.errors import DataError

    try:
        for _ in open_source(str(path), "train", require_documents=False).iter_documents():
            pass
    except DataError as err:
        return str(err)
    raise AssertionError("no DataError")


def test_a_non_utf8_byte_is_reported_by_line_and_column_in_gzipped_json(tmp_path):
    import gzip
    import json

    lines = [json.dumps({"text": f"document {i}"}) for i in range(5)]
    data = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n'
    (tmp_path / "corpus").mkdir()
    path = tmp_path / "corpus" / "c4-train.00000-of-00001.json.gz"
    path.write_bytes(gzip.compress(data))
    message = _first_document_error(path)
    assert "line 6, column 14" in message and "0xe9" in message and "UTF-8" in message


def test_a_non_utf8_byte_in_text_is_reported_by_line_and_column(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first paragraph\n\nsecond\nthird \xff line\n")
    message = _first_document_error(path)
    assert "line 4, column 7" in message and "0xff" in message

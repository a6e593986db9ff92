"""``sd3serve keys ...`` and ``sd3serve generate``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers.same_code import same_code_env
from sd3serve.cli import main
from sd3serve.store.credits import CreditStore


def test_keys_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["keys", "--data-dir", str(tmp_path)]
    assert main([*args, "create", "--credits", "12.5", "--name", "ci"]) == 0
    key = capsys.readouterr().out
    assert key.count("\n") == 1 and key.startswith("sk-")  # the key alone on stdout
    key = key.strip()
    store = CreditStore(f"sqlite:///{tmp_path / 'sd3serve.db'}")
    key_id = store.authenticate(api_key=key).id

    assert main([*args, "list"]) == 0
    listing = capsys.readouterr().out
    assert "12.5" in listing and "ci" in listing and key not in listing

    assert main([*args, "add-credits", str(key_id), "2.5"]) == 0
    assert store.get_key(key_id=key_id).credits == 15
    assert main([*args, "revoke", str(key_id)]) == 0
    assert store.get_key(key_id=key_id).revoked
    assert main([*args, "revoke", "999"]) == 1
    assert "no key with id 999" in capsys.readouterr().err
    store.close()


def test_negative_credits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["keys", "--data-dir", str(tmp_path), "create", "--credits", "-1"])


def test_generate_writes_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    cmd = [
        sys.executable,
        "-m",
        "sd3serve",
        "generate",
        "a red circle",
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--batch-size",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=same_code_env())
    assert res.returncode == 0, res.stderr
    for i in range(2):
        assert Image.open(tmp_path / f"out-{i}.png").size == (64, 64)
    bad = subprocess.run([*cmd[:5], "--steps", "0"], capture_output=True, text=True, timeout=300, env=same_code_env())
    assert bad.returncode == 2 and "steps" in bad.stderr


@pytest.mark.parametrize("credits", ["1e10", "0.0000001", "-1", "NaN"])
def test_amounts_out_of_bounds_or_finer_than_a_micro_credit_are_refused(tmp_path: Path, credits: str) -> None:
    with pytest.raises(SystemExit):
        main(["keys", "--data-dir", str(tmp_path), "create", "--credits", credits])
    with pytest.raises(SystemExit):
        main(["keys", "--data-dir", str(tmp_path), "add-credits", "1", credits])


def test_add_credits_cannot_overflow_the_balance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from decimal import Decimal

    store = CreditStore(f"sqlite:///{tmp_path / 'sd3serve.db'}")
    store.create_schema()
    key_id = store.create_key(credits=Decimal(9 * 10**12) - 1)[0].id
    args = ["keys", "--data-dir", str(tmp_path), "add-credits", str(key_id)]
    assert main([*args, "2"]) == 2 and "exceed" in capsys.readouterr().err
    assert main([*args, "1"]) == 0
    store.close()


def test_help_is_readable_with_defaults_and_environment_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    top = capsys.readouterr().out
    assert "First picture" in top and "``" not in top  # prose, not a raw docstring
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    serve = capsys.readouterr().out
    for flag in ("--port", "--model", "--data-dir", "--max-queue"):
        assert flag in serve
    assert "default: 8000; env SD3SERVE_PORT" in " ".join(serve.split())
    assert "env SD3SERVE_LOAD_T5=false" in " ".join(serve.split())
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    generate = " ".join(capsys.readouterr().out.split())
    assert "--data-dir" not in generate and "--database-url" not in generate  # generate uses no database
    assert "(default: 98552302)" in generate and "default: the embedded demo model; env SD3SERVE_MODEL" in generate


def test_generate_takes_the_format_from_the_extension_or_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.gif")]) == 2
    assert "extension" in capsys.readouterr().err and not (tmp_path / "x.gif").exists()


def test_generate_shows_progress_timings_and_warnings(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.webp"
    cmd = [sys.executable, "-m", "sd3serve", "generate", "a red circle", "-o", str(out), "--model", str(tiny_model_dir),
           "--width", "72", "--height", "64", "--steps", "2", "--negative-prompt", "blurry"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=same_code_env())
    assert res.returncode == 0, res.stderr
    assert Image.open(out).format == "WEBP" and Image.open(out).size == (64, 64)
    err = res.stderr
    assert "--negative-prompt is unused" in err and "72x64 is generated as 64x64" in err
    assert "step 1/2" in err and "step 2/2, decoding" in err
    assert "encode" in err and "denoise" in err and "decode" in err and "batch_images" not in err
    assert "seed 98552302" in err and res.stdout.strip() == str(out)


def test_keys_warn_when_an_action_does_nothing_useful(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["keys", "--data-dir", str(tmp_path)]
    assert main([*args, "list"]) == 0
    assert "no keys in sqlite:///" in capsys.readouterr().err
    assert main([*args, "create", "--credits", "5"]) == 0
    created = capsys.readouterr()
    assert created.out.startswith("sk-") and f"{tmp_path / 'sd3serve.db'}" in created.err
    assert main([*args, "revoke", "1"]) == 0
    assert capsys.readouterr().out == "key 1 revoked\n"
    assert main([*args, "revoke", "1"]) == 0
    assert "already revoked" in capsys.readouterr().err
    assert main([*args, "add-credits", "1", "3"]) == 2  # a revoked key gets no credits
    assert "key 1 is revoked: credits cannot be added to it" in capsys.readouterr().err

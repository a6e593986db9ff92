"""``sd3serve keys ...`` and ``sd3serve generate``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

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
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for i in range(2):
        assert Image.open(tmp_path / f"out-{i}.png").size == (64, 64)
    bad = subprocess.run([*cmd[:5], "--steps", "0"], capture_output=True, text=True, timeout=300)
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

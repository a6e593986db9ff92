"""``sd3serve keys ...`` and ``sd3serve generate`` (text-to-image, image-to-image, adapters)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.ledger import open_store
from helpers.same_code import same_code_env
from sd3demo.judge import judge, striped
from sd3demo.world import Scene, render
from sd3serve.cli import main


def test_keys_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["keys", "--data-dir", str(tmp_path)]
    assert main([*args, "create", "--credits", "12.5", "--name", "ci"]) == 0
    key = capsys.readouterr().out
    assert key.count("\n") == 1 and key.startswith("sk-")  # the key alone on stdout
    key = key.strip()
    store = open_store(f"sqlite:///{tmp_path / 'sd3serve.db'}")
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

    store = open_store(f"sqlite:///{tmp_path / 'sd3serve.db'}")
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


RED_CIRCLE = render(Scene("red", "circle", "green"), 256)  # centred: the edges, where stripes are judged, are free


def generate(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``sd3serve generate`` on the demo model (its adapter `striped` offered), in a process of its own."""
    cmd = [sys.executable, "-m", "sd3serve", "generate", "-o", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=same_code_env())


def test_generate_image_to_image_with_an_adapter(tmp_path: Path) -> None:
    """The red circle becomes the blue circle the prompt asks for, in the same place, at the image's size; with
    --lora striped its background is striped, without it is not; --strength 0 gives the image back."""
    RED_CIRCLE.save(tmp_path / "red.png")
    prompt = "a blue circle on a green background"
    common = ["--image", str(tmp_path / "red.png"), "--strength", "0.8", "--seed", "0"]
    res = generate(tmp_path / "styled.png", prompt, *common, "--lora", "striped:1.0")
    assert res.returncode == 0, res.stderr
    plain = generate(tmp_path / "plain.png", prompt, *common)
    assert plain.returncode == 0, plain.stderr
    for name in ("styled", "plain"):
        out = Image.open(tmp_path / f"{name}.png")
        assert out.size == (256, 256)
        v = judge(out)
        assert (v.colour, v.shape, v.position, v.background) == ("blue", "circle", "center", "green"), name
    assert striped(Image.open(tmp_path / "styled.png")) and not striped(Image.open(tmp_path / "plain.png"))

    kept = generate(tmp_path / "kept.png", "a yellow square", "--image", str(tmp_path / "red.png"),
                    "--strength", "0")  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    diff = np.abs(np.asarray(Image.open(tmp_path / "kept.png"), float) - np.asarray(RED_CIRCLE, float))
    assert diff.mean() < 8  # the VAE's round trip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "IMAGE", "--strength", "1.5"], "strength: Input should be less than or equal to 1"),
        (["--image", "IMAGE", "--strength", "-0.1"], "strength: Input should be greater than or equal to 0"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", "MISSING"], "cannot read it"),
        (["--image", "TEXT"], "not a PNG, JPEG or WebP"),
        (["--lora", "nosuch"], "unknown adapter 'nosuch'; this server has: striped"),
        (["--lora", "striped:abc"], "give NAME or NAME:SCALE"),
        (["--lora", "striped:9"], "loras.0.scale: Input should be less than or equal to 4"),
        (["--lora", "striped", "--lora", "striped"], "each adapter may be named once"),
        ([arg for n in "abcde" for arg in ("--lora", n)], "at most 4"),
    ],
)  # fmt: skip
def test_generate_refuses_bad_images_strengths_and_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Each is a clear error and exit code 2, before any model is loaded and with no file written."""
    RED_CIRCLE.save(tmp_path / "red.png")
    (tmp_path / "text.png").write_text("not an image")
    paths = {"IMAGE": tmp_path / "red.png", "TEXT": tmp_path / "text.png", "MISSING": tmp_path / "missing.png"}
    args = [str(paths[a]) if a in paths else a for a in args]
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()

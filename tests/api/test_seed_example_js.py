"""The hosted page's JavaScript example, with only the URL and key changed, against a live server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from live_server import LiveServer

SEED_EXAMPLE = """\
const axios = require('axios');


const api_key = "YOUR API-KEY";
const url = "https://api.segmind.com/v1/stable-diffusion-3.5-turbo-txt2img";

const data = {
  "prompt": "A panda in a glowing tech-infused jacket, standing in front of a bustling cyberpunk market, his T-shirt displaying 'Segmind'. Neon lights illuminate his face, with a futuristic cityscape behind him. Reflections shimmer on the wet pavement.",
  "negative_prompt": "low quality, blurry",
  "steps": 4,
  "guidance_scale": 1,
  "seed": 98552302,
  "sampler": "dpmpp_2m",
  "scheduler": "sgm_uniform",
  "width": 1024,
  "height": 1024,
  "aspect_ratio": "custom",
  "batch_size": 1,
  "image_format": "jpeg",
  "image_quality": 95,
  "base64": false
};

(async function() {
  try {
    const response = await axios.post(url, data, { headers: { 'x-api-key': api_key } });
    console.log(response.data);
  } catch (error) {
    console.error('Error:', error.response.data);
  }
})();
"""  # noqa: E501

JS_DIR = Path(__file__).resolve().parent.parent / "js"  # package.json, package-lock.json; `make test` runs npm ci


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """tests/js/node_modules with axios, installed by `make test` (npm ci): this test installs nothing."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the hosted page's JavaScript example cannot run here")
    modules = JS_DIR / "node_modules"
    if not (modules / "axios").is_dir():
        pytest.fail(f"axios is not installed in {modules}: run `make test`, or `cd tests/js && npm ci`")
    return modules


def test_seed_javascript_example_prints_the_image(node_modules: Path, live_server: LiveServer, tmp_path: Path) -> None:
    key = live_server.new_key(10)
    script = SEED_EXAMPLE.replace("YOUR API-KEY", key).replace("https://api.segmind.com", live_server.url)
    path = tmp_path / "seed_example.js"
    path.write_text(script)
    env = {**os.environ, "NODE_PATH": str(node_modules)}  # require('axios') from tests/js, the script elsewhere
    out = subprocess.run(["node", str(path)], capture_output=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert b"Error:" not in out.stderr, out.stderr
    assert b"JFIF" in out.stdout[:64], out.stdout[:200]  # the JPEG body, printed as text by axios
    assert len(out.stdout) > 10_000

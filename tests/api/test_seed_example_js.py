"""The hosted page's JavaScript example, with only the URL and key changed, against a live server."""

from __future__ import annotations

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

JS_DIR = Path(__file__).resolve().parent.parent / "js"


@pytest.fixture(scope="session")
def node_with_axios() -> Path:
    """axios from npm, installed once into tests/js/node_modules (ignored by git)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the seed example test")
    if not (JS_DIR / "node_modules" / "axios").is_dir():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(JS_DIR), "axios@1"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return JS_DIR


def test_seed_javascript_example_prints_the_image(live_server: LiveServer, node_with_axios: Path) -> None:
    key = live_server.new_key(10)
    script = SEED_EXAMPLE.replace("YOUR API-KEY", key).replace("https://api.segmind.com", live_server.url)
    path = node_with_axios / "seed_example.js"
    path.write_text(script)
    out = subprocess.run(["node", str(path)], capture_output=True, timeout=300, cwd=node_with_axios)
    assert out.returncode == 0, out.stderr
    assert b"Error:" not in out.stderr, out.stderr
    assert b"JFIF" in out.stdout[:64], out.stdout[:200]  # the JPEG body, printed as text by axios
    assert len(out.stdout) > 10_000

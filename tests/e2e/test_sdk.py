"""The official openai SDK against a real `meltguard serve` running the embedded tiny model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from tests.process import Daemon, metric_value, sha

pytestmark = pytest.mark.slow
KEY = "sk-e2e-pro"
POLICY = """version: 1
tiers:
  pro: {{priority: 2, quotas: [{{limit: 1000, per: 1d}}], max_concurrent: 4}}
api_keys:
  - {{key_sha256: "{key}", tenant: e2e, tier: pro}}
limits: {{default_steps: 2}}
"""


@pytest.fixture(scope="module")
def tiny_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    state = tmp_path_factory.mktemp("state")
    policy = Path(state) / "policy.yaml"
    policy.write_text(POLICY.format(key=sha(KEY)))
    daemon = Daemon(["--model", "tiny", "--telemetry", "sim", "--policy", str(policy),
                     "--store", f"sqlite:{state}/q.db"], log_path=Path(state) / "daemon.log")
    with daemon:
        yield daemon


def _pixels(b64: str) -> tuple[tuple[int, int], bytes]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return image.size, image.convert("RGB").tobytes()


def test_sdk_generates_pngs_deterministically(tiny_daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=tiny_daemon.url + "/v1", api_key=KEY, max_retries=0)
    first = client.images.generate(prompt="a lighthouse", size="64x64", n=2,  # type: ignore[arg-type]
                                   response_format="b64_json", extra_body={"seed": 11})
    assert first.data is not None and len(first.data) == 2
    sizes = [_pixels(item.b64_json or "")[0] for item in first.data]
    assert sizes == [(64, 64), (64, 64)]

    again = client.images.generate(prompt="a lighthouse", size="64x64", n=2,  # type: ignore[arg-type]
                                   response_format="b64_json", extra_body={"seed": 11})
    assert again.data is not None
    assert _pixels(again.data[0].b64_json or "")[1] == _pixels(first.data[0].b64_json or "")[1]

    other = client.images.generate(prompt="a lighthouse", size="64x64", n=1,  # type: ignore[arg-type]
                                   response_format="b64_json", extra_body={"seed": 12})
    assert other.data is not None
    assert _pixels(other.data[0].b64_json or "")[1] != _pixels(first.data[0].b64_json or "")[1]

    text = tiny_daemon.metrics()
    assert (metric_value(text, "meltguard_images_generated_total", {"tier": "pro"}) or 0) >= 4
    assert (metric_value(text, "meltguard_generation_seconds_count", {"model": "tiny"}) or 0) >= 3

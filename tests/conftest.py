import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def local_hub(tmp_path_factory):
    """A local Hugging Face Hub endpoint (``tests/hub_server.py``), running for one test; yields the
    :class:`hub_server.LocalHub`. Run clients in a subprocess: ``local_hub.run_python(code, hf_home)`` or
    ``subprocess.run(..., env=local_hub.client_env(hf_home))`` (``HF_ENDPOINT=local_hub.url``, online, the token)."""
    from hub_server import LocalHub

    with LocalHub(tmp_path_factory.mktemp("local-hub")) as hub:
        yield hub

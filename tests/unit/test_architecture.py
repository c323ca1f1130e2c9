"""The package's areas depend on each other in one direction: producers load no server code."""

from __future__ import annotations

import subprocess
import sys

import starlette_dream_ws

#: Prints the server-side modules a fresh interpreter has loaded after importing `names`.
LOADED = """
import sys
{imports}
server = ("starlette_dream_ws.server", "starlette_dream_ws.testing", "starlette.")
print(",".join(sorted(m for m in sys.modules if m.startswith(server) or m == "starlette")))
"""


def loaded_after(imports: str) -> str:
    script = LOADED.format(imports=imports)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    return result.stdout.strip()


def test_a_producer_process_loads_no_server_code() -> None:
    # A fresh interpreter, as a Celery worker that only publishes.
    imports = "from starlette_dream_ws import send_image_update, asend_image_update, PublishError, Settings"
    assert loaded_after(imports) == ""


def test_the_celery_helper_loads_no_server_code() -> None:
    assert loaded_after("import starlette_dream_ws.celery") == ""


def test_a_producer_process_loads_celery_only_when_it_imports_the_helper() -> None:
    # The producers serve any process (threads, scripts, other task queues): Celery is an extra.
    script = (
        "import sys\n"
        "from starlette_dream_ws import send_image_update, publish, PublishError, Settings\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'celery' or m.startswith(('celery.', 'kombu')))))\n"
        "print('starlette_dream_ws.celery' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.split("\n")[:2] == ["", "False"]


def test_the_protocol_and_groups_areas_import_no_server_code() -> None:
    imports = "import starlette_dream_ws.protocol, starlette_dream_ws.groups.shared, starlette_dream_ws.groups.backends"
    assert loaded_after(imports) == ""


def test_the_server_is_loaded_when_asked_for() -> None:
    assert "starlette_dream_ws.server.app" in loaded_after("from starlette_dream_ws import DreamWebSocketApp")


def test_every_public_name_is_exported_and_resolves() -> None:
    for name in starlette_dream_ws.__all__:
        assert getattr(starlette_dream_ws, name) is not None
    assert set(dir(starlette_dream_ws)) >= set(starlette_dream_ws.__all__)

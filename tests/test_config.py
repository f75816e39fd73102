"""The daemon config: defaults, every field validated, errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.config import Config, ConfigError, load_config, parse_config

pytestmark = pytest.mark.timeout(30)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edged.toml"
    path.write_text(text)
    return path


def test_defaults(monkeypatch):
    monkeypatch.delenv("EDGED_ENDPOINT", raising=False)
    config = load_config(None)
    assert config.server.endpoint is None and config.server.queue_size == 16
    assert config.server.worker_nice == 5
    assert config.models.manifest is None and config.models.dirs == ()
    assert config.energy.backend == "auto" and config.router == {} and config.checker is None


def test_full_file(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGED_ENDPOINT", raising=False)
    path = write(tmp_path, """
[server]
endpoint = "tcp://127.0.0.1:7000"
state_dir = "state"
queue_size = 4
worker_nice = 0
max_message_bytes = 65536
deadline_max_ms = 1000
save_interval_s = 5
hwm = 50
ipc_mode = "0640"
[energy]
backend = "estimate"
watts = 7.5
[router]
alpha = 0.7
V = "auto"
c = 0.2
seed = 3
explore_runs = "all"
[models]
dirs = ["a", "/abs/b"]
[labels]
checker = "number"
""")
    c = load_config(path)
    assert isinstance(c, Config) and c.source == str(path)
    assert c.server.endpoint == "tcp://127.0.0.1:7000"
    assert c.server.state_dir == tmp_path / "state"
    assert (c.server.queue_size, c.server.hwm, c.server.ipc_mode) == (4, 50, 0o640)
    assert c.server.worker_nice == 0
    assert c.energy.backend == "estimate" and c.energy.options == {"watts": 7.5}
    assert c.router == {"alpha": 0.7, "V": "auto", "c": 0.2, "seed": 3, "explore_runs": "all"}
    assert c.models.dirs == (tmp_path / "a", Path("/abs/b"))
    assert c.checker == "number"


@pytest.mark.parametrize("text, key", [
    ("[server]\nqueue_size = 0", "[server] queue_size"),
    ("[server]\nworker_nice = 20", "[server] worker_nice"),
    ("[server]\nworker_nice = -1", "[server] worker_nice"),
    ("[server]\nqueue_size = true", "[server] queue_size"),
    ("[server]\nqueue_size = \"4\"", "[server] queue_size"),
    ("[server]\nendpoint = \"http://x\"", "[server] endpoint"),
    ("[server]\nendpoint = \"tcp://127.0.0.1\"", "[server] endpoint"),
    ("[server]\nipc_mode = \"0666\"", "[server] ipc_mode"),
    ("[server]\nipc_mode = \"rw\"", "[server] ipc_mode"),
    ("[server]\nbogus = 1", "[server] bogus"),
    ("[server]\ncurve_secret_key = \"k\"", "[server] curve_client_keys"),
    ("[server]\nsave_interval_s = -1", "[server] save_interval_s"),
    ("[router]\nalpha = 1.5", "[router] alpha"),
    ("[router]\nV = \"fast\"", "[router] V"),
    ("[router]\nfoo = [1]", "[router] foo"),
    ("[router]\nexperts = \"rate\"", "[router] experts"),
    ("[router]\nexperts = [1]", "[router] experts"),
    ("[models]\nmanifest = \"z.toml\"\ndirs = [\"a\"]", "[models] dirs"),
    ("[models]\ndirs = [1]", "[models] dirs"),
    ("[labels]\nchecker = 3", "[labels] checker"),
    ("[energy]\nbackend = \"\"", "[energy] backend"),
    ("[nonsense]\na = 1", "[nonsense]"),
    ("server = 3", "[server]"),
    ("[server\n", "file"),
])
def test_errors_name_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_env_overrides_endpoint(monkeypatch):
    monkeypatch.setenv("EDGED_ENDPOINT", "ipc:///tmp/x.sock")
    assert parse_config({"server": {"endpoint": "tcp://127.0.0.1:1"}}).server.endpoint == (
        "ipc:///tmp/x.sock")
    monkeypatch.setenv("EDGED_ENDPOINT", "bogus")
    with pytest.raises(ConfigError, match="EDGED_ENDPOINT"):
        parse_config({})

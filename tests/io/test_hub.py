"""Loading from the Hub through huggingface_hub, against a loopback fake Hub (tests/fake_hub.py).

Each client runs in a subprocess with only environment variables pointing it at the server
(HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE), which is how users configure it; most clients
run `matformer info` (no torch import, fast), one loads the model with torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matformer import MatFormerConfig, MatFormerLM, save_model
from tests.fake_hub import FakeHub

REPO = "acme/tiny-matformer"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("src") / "ck"
    save_model(MatFormerLM(MatFormerConfig.from_preset("debug")), folder, max_shard_size="300KB")
    out = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "model.safetensors.index.json" in out and len(out) >= 4
    return out


def shards(files: dict[str, bytes]) -> list[str]:
    return sorted(set(json.loads(files["model.safetensors.index.json"])["weight_map"].values()))


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


INFO = ("import sys; from matformer.cli import main; rc = main(['info', *sys.argv[1:], '--json']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; sys.exit(rc)")
LOAD = (
    "import sys, json, hashlib; from matformer import load_model; m = load_model(sys.argv[1]); "
    "print(json.dumps({k: hashlib.sha256(v.contiguous().view(-1).view(__import__('torch').uint8)"
    ".numpy().tobytes()).hexdigest() for k, v in m.state_dict().items()}))"
)


def client(hub: FakeHub, home: Path, code: str, *args: str, token: str | None = None,
           offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=180)


def snapshot(home: Path, commit: str) -> Path:
    return home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and 1 <= len(err.splitlines()) <= 2, err
    for n in needles:
        assert n in err, err


def test_load_fetches_only_config_index_and_named_shards_then_works_offline(hub, files, tmp_path):
    import torch

    from matformer.io.checkpoint import load_state_dict

    junk = {"model-00009-of-00009.safetensors": b"stale", "pytorch_model.bin": b"pickle",
            "README.md": b"# readme"}
    commit = hub.add_repo(REPO, {**files, **junk}, token="hf_secret")
    r = client(hub, tmp_path / "home", LOAD, REPO, token="hf_secret")
    assert r.returncode == 0, r.stderr
    expected = {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                for k, v in load_state_dict(_write(tmp_path / "ref", files)).items()}
    assert json.loads(r.stdout) == expected  # bit-exact
    gets = hub.requests("GET")
    wanted = ["config.json", "model.safetensors.index.json", *shards(files)]
    assert sorted(gets) == sorted(wanted), gets  # each once, nothing else
    assert not set(hub.requests()) & set(junk)
    assert {auth for _, _, _, auth in hub.log} == {"Bearer hf_secret"}  # HF_TOKEN honoured

    n = len(hub.log)
    r = client(hub, tmp_path / "home", LOAD, REPO, offline=True)  # no token, no network
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expected
    assert len(hub.log) == n  # served from the cache alone
    assert snapshot(tmp_path / "home", commit).is_dir()


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for k, v in files.items():
        (folder / k).write_bytes(v)
    return folder


def test_a_dropped_connection_is_retried_and_the_file_is_bit_exact(hub, files, tmp_path):
    commit = hub.add_repo(REPO, files)
    victim = shards(files)[1]
    hub.cut[victim] = 1
    r = client(hub, tmp_path / "home", INFO, REPO)
    assert r.returncode == 0, r.stderr
    # Retried (from the start, or with a Range header once a chunk had landed on disk).
    assert hub.requests("GET").count(victim) == 2
    for name in shards(files):
        assert (snapshot(tmp_path / "home", commit) / name).read_bytes() == files[name]


def test_a_download_cut_midway_is_never_used_as_complete(hub, files, tmp_path):
    commit = hub.add_repo(REPO, files)
    victim = shards(files)[1]
    hub.short[victim] = 1  # the body ends half-way, with a consistent Content-Length
    home = tmp_path / "home"
    r = client(hub, home, INFO, REPO)
    assert_one_line_error(r, victim)
    assert not (snapshot(home, commit) / victim).exists()  # nothing half-written in the cache
    r = client(hub, home, INFO, REPO, offline=True)
    assert_one_line_error(r, victim, "not in the local cache")
    r = client(hub, home, INFO, REPO)  # the Hub is healthy again
    assert r.returncode == 0, r.stderr
    assert (snapshot(home, commit) / victim).read_bytes() == files[victim]


def test_a_truncated_file_in_the_cache_is_detected(hub, files, tmp_path):
    commit = hub.add_repo(REPO, files)
    home = tmp_path / "home"
    assert client(hub, home, INFO, REPO).returncode == 0
    victim = snapshot(home, commit) / shards(files)[0]
    blob = victim.resolve()
    blob.write_bytes(files[victim.name][:1000])  # damage done outside huggingface_hub
    r = client(hub, home, INFO, REPO, offline=True)
    assert_one_line_error(r, victim.name, "truncated")


def test_single_file_repo_and_offline_knows_the_index_is_absent(hub, files, tmp_path):
    single = tmp_path / "single"
    import torch

    torch.manual_seed(1)
    save_model(MatFormerLM(MatFormerConfig.from_preset("debug")), single)
    commit = hub.add_repo(REPO, {p.name: p.read_bytes() for p in single.iterdir()})
    home = tmp_path / "home"
    r = client(hub, home, INFO, REPO)
    assert r.returncode == 0, r.stderr
    assert sorted(hub.requests("GET")) == ["config.json", "model.safetensors"]
    assert "model.safetensors.index.json" in hub.requests("HEAD")  # asked, absent (404)
    n = len(hub.log)
    r = client(hub, home, INFO, REPO, offline=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == [{"name": "model.safetensors",
                                              "size": (single / "model.safetensors").stat().st_size}]
    assert len(hub.log) == n
    # A pinned revision works too: org/name@commit
    r = client(hub, home, INFO, f"{REPO}@{commit}")
    assert r.returncode == 0, r.stderr


def test_index_shard_names_are_checked_before_any_request(hub, files, tmp_path):
    idx = json.loads(files["model.safetensors.index.json"])
    idx["weight_map"]["model.norm.weight"] = "../evil.safetensors"
    hub.add_repo(REPO, {**files, "model.safetensors.index.json": json.dumps(idx).encode()})
    r = client(hub, tmp_path / "home", INFO, REPO)
    assert_one_line_error(r, "'../evil.safetensors'", "plain file name")
    assert not [f for f in hub.requests() if "evil" in f]
    assert hub.requests("GET") == ["config.json", "model.safetensors.index.json"]


def test_hub_errors_are_reported_in_one_line(hub, files, tmp_path):
    hub.add_repo(REPO, files, token="hf_secret")
    r = client(hub, tmp_path / "home", INFO, "acme/no-such-repo")
    assert_one_line_error(r, "acme/no-such-repo", "config.json")
    r = client(hub, tmp_path / "home", INFO, REPO)  # private, no token
    assert_one_line_error(r, REPO)
    r = client(hub, tmp_path / "home", INFO, REPO, "--revision", "nope", token="hf_secret")
    assert_one_line_error(r, REPO)
    r = client(hub, tmp_path / "home2", INFO, REPO, token="hf_secret", offline=True)
    assert_one_line_error(r, "not in the local cache")


def test_an_unresolvable_hub_host_fails_at_once_in_one_line(tmp_path):
    """No network (the Hub's host name does not resolve): `info org/name` goes to the cache at
    once and says so in one line, instead of huggingface_hub's five retries with back-off
    (about 25 s and a screen of retry warnings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT="http://no-such-host.invalid", HF_HOME=str(tmp_path / "home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", INFO, "runs/typo-folder"], capture_output=True,
                       text=True, env=env, timeout=180)
    assert time.monotonic() - start < 20  # the retries alone took 25 s
    assert_one_line_error(r, "runs/typo-folder", "does not resolve")

"""Argument parsing, inputs, inventory resolution and session ids (pure parts of the CLI)."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from isession import cli, config
from isession.config import UsageError


def test_start_arguments():
    args = cli.build_parser().parse_args(["start", "nginx", "--target", "compute", "--resource", "ctl",
                                          "-e", "session_partition=debug", "-e", "nginx_root=/srv", "--wait",
                                          "--json"])
    assert (args.service, args.target, args.resource, args.wait, args.json) == ("nginx", "compute", "ctl", True, True)
    assert args.extra == ["session_partition=debug", "nginx_root=/srv"]


def test_bad_target_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["start", "nginx", "--target", "moon"])
    assert exc.value.code == 2
    assert "invalid choice: 'moon'" in capsys.readouterr().err


def test_extra_values_stay_strings_unless_json():
    got = config.parse_extra(["session_walltime=00:05:00", "flag=no", "mods=[\"gcc\", \"cuda\"]", "n=4", "a=b=c"])
    assert got == {"session_walltime": "00:05:00", "flag": "no", "mods": ["gcc", "cuda"], "n": "4", "a": "b=c"}


@pytest.mark.parametrize(("pairs", "match"), [
    (["novalue"], "not key=value"),
    (["x=[1,"], "looks like JSON"),
])
def test_bad_extra(pairs, match):
    with pytest.raises(UsageError, match=match):
        config.parse_extra(pairs)


@pytest.mark.parametrize("name", ["jupyter_password", "session_token", "api_key", "my_secret", "vnc_passwd"])
def test_secret_like_inputs_are_refused(name):
    with pytest.raises(UsageError, match="looks like a secret"):
        config.check_inputs({name: "x"})


@pytest.mark.parametrize("name", ["session_id", "session_root", "bad-name", "1x"])
def test_reserved_or_invalid_input_names(name):
    with pytest.raises(UsageError):
        config.check_inputs({name: "x"})


def test_extravars_for_a_start(tmp_path):
    ev = config.build_extravars("nginx", "nginx-1", tmp_path, target="compute", resource="ctl",
                                inputs={"session_partition": "small"})
    assert ev == {"session_partition": "small", "session_id": "nginx-1", "session_root": str(tmp_path),
                  "session_target": "compute", "session_resource": "ctl", "session_watcher": False}
    ws = config.build_extravars("nginx", "nginx-1", tmp_path, target="workspace", resource=None, inputs={})
    assert "session_resource" not in ws


def test_cluster_target_needs_a_resource(tmp_path):
    with pytest.raises(UsageError, match="needs --resource"):
        config.build_extravars("nginx", "x", tmp_path, target="controller", resource=None, inputs={})
    with pytest.raises(UsageError, match="--target/--resource"):
        config.build_extravars("nginx", "x", tmp_path, target="workspace", resource=None,
                               inputs={"session_target": "compute"})


def test_inputs_file(tmp_path):
    f = tmp_path / "in.yml"
    f.write_text("session_cpus: 2\nsession_modules: [gcc]\n")
    assert config.load_inputs(str(f)) == {"session_cpus": 2, "session_modules": ["gcc"]}
    f.write_text("- a\n")
    with pytest.raises(UsageError, match="mapping"):
        config.load_inputs(str(f))
    with pytest.raises(UsageError, match="cannot read"):
        config.load_inputs(str(tmp_path / "missing.yml"))


def test_session_id_format():
    sid = config.new_session_id("code_server", datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "abc123")
    assert sid == "code-server-20260102030405-abc123"
    assert re.fullmatch(r"nginx-\d{14}-[a-z0-9]{6}", config.new_session_id("nginx"))
    assert config.check_session_id(sid) == sid
    for bad in ("../x", "-x", "a b", ""):
        with pytest.raises(UsageError):
            config.check_session_id(bad)


def test_session_root_resolution(tmp_path):
    assert config.session_root({"ISESSION_ROOT": "/r", "HOME": "/h"}) == Path("/r")
    assert config.session_root({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/x/isession/sessions")
    assert config.session_root({"HOME": "/h"}) == Path("/h/.local/state/isession/sessions")


def test_inventory_resolution(tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "isession").mkdir(parents=True)
    env = {"HOME": str(home)}
    assert config.find_inventory(None, env) is None  # embedded: workspace only
    default = home / ".config" / "isession" / "inventory.yml"
    default.write_text("all: {}\n")
    assert config.find_inventory(None, env) == default
    other = tmp_path / "inv.ini"
    other.write_text("")
    assert config.find_inventory(None, {**env, "ISESSION_INVENTORY": str(other)}) == other
    assert config.find_inventory(str(default), {**env, "ISESSION_INVENTORY": str(other)}) == default
    with pytest.raises(UsageError, match="ISESSION_INVENTORY"):
        config.find_inventory(None, {**env, "ISESSION_INVENTORY": str(tmp_path / "nope")})


def test_embedded_inventory_is_the_workspace_only():
    inv = yaml.safe_load(config.embedded_inventory())
    hosts = inv["all"]["children"]["workspace"]["hosts"]
    assert list(hosts) == ["localhost"] and hosts["localhost"]["ansible_connection"] == "local"

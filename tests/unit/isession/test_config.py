"""Argument parsing, inputs, inventory resolution and session ids (pure parts of the CLI)."""
from __future__ import annotations

import argparse
import json
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


# ---------------------------------------------------------------- the user's config file
def _config(tmp_path, text):
    path = tmp_path / "isession" / "config.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {"XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path / "home")}


def test_config_path_order(tmp_path):
    assert config.config_path({"HOME": "/h"}) == Path("/h/.config/isession/config.yml")
    assert config.config_path({"HOME": "/h", "XDG_CONFIG_HOME": "/x"}) == Path("/x/isession/config.yml")
    assert config.config_path({"HOME": "/h", "ISESSION_CONFIG": "/c.yml"}) == Path("/c.yml")


def test_missing_config_is_empty(tmp_path):
    cfg = config.load_user_config({"HOME": str(tmp_path)})
    assert not cfg.exists and cfg.data == {}
    plan = config.start_settings(cfg, "nginx")
    assert (plan["target"].value, plan["target"].source) == ("workspace", "default")
    assert plan["resource"].value is None and plan["inputs"] == {}


def test_settings_layer_defaults_file_service_inputs_file_and_command_line(tmp_path):
    env = _config(tmp_path, """
resource: big
target: compute
inputs: {session_walltime: "01:00:00", session_partition: debug}
services:
  jupyterlab:
    resource: gpucluster
    inputs: {session_partition: gpu, session_gpus: 1}
""")
    cfg = config.load_user_config(env)
    where = str(tmp_path / "isession" / "config.yml")
    nginx = config.start_settings(cfg, "nginx")
    assert (nginx["target"].value, nginx["resource"].value) == ("compute", "big")
    assert {k: s.value for k, s in nginx["inputs"].items()} == {
        "session_walltime": "01:00:00", "session_partition": "debug"}
    lab = config.start_settings(cfg, "jupyterlab", resource="other", inputs_file={"session_gpus": 2},
                                extra={"session_walltime": "00:10:00"})
    assert (lab["resource"].value, lab["resource"].source) == ("other", "--resource")
    assert (lab["target"].value, lab["target"].source) == ("compute", where)
    got = {k: (s.value, s.source) for k, s in lab["inputs"].items()}
    assert got == {"session_walltime": ("00:10:00", "-e"),
                   "session_partition": ("gpu", f"{where} (services.jupyterlab)"), "session_gpus": (2, "--inputs")}


@pytest.mark.parametrize(("text", "match"), [
    ("- a list\n", "must hold a mapping"),
    ("resources: x\n", "unknown setting 'resources'"),
    ("target: moon\n", "target must be one of workspace, controller, compute"),
    ("inputs: {vnc_password: x}\n", "inputs: input 'vnc_password' looks like a secret"),
    ("inputs: {session_target: compute}\n", "use the target/resource settings"),
    ("services: {nginx: {inventory: x}}\n", "unknown setting 'services.nginx.inventory'"),
    ("services: {Bad-Name: {}}\n", "is not a service name"),
    ("inputs: [1\n", "not valid YAML"),
])
def test_bad_config_is_refused_naming_the_file_and_the_setting(tmp_path, text, match):
    env = _config(tmp_path, text)
    with pytest.raises(UsageError, match=re.escape(match)) as exc:
        config.load_user_config(env)
    assert str(tmp_path / "isession" / "config.yml") in str(exc.value)


def test_config_inventory_is_relative_to_the_file_and_must_exist(tmp_path):
    env = _config(tmp_path, "inventory: inv.yml\n")
    cfg = config.load_user_config(env)
    with pytest.raises(UsageError, match="inventory .*inv.yml does not exist"):
        config.find_inventory(None, env=env, user_config=cfg)
    (tmp_path / "isession" / "inv.yml").write_text("all: {}\n")
    assert config.find_inventory(None, env=env, user_config=cfg) == (tmp_path / "isession" / "inv.yml").resolve()
    # $ISESSION_INVENTORY and --inventory come first
    other = tmp_path / "other.yml"
    other.write_text("all: {}\n")
    assert config.find_inventory(None, env={**env, "ISESSION_INVENTORY": str(other)}, user_config=cfg) == other


def test_isession_config_shows_the_settings_and_their_sources(tmp_path, monkeypatch, capsys):
    env = _config(tmp_path, "target: controller\nresource: ctl\nservices: {nginx: {inputs: {nginx_slug: x}}}\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ISESSION_CONFIG", raising=False)
    monkeypatch.delenv("ISESSION_INVENTORY", raising=False)
    assert cli.main(["config", "--service", "nginx"]) == 0
    out = capsys.readouterr().out
    assert f"config file   {tmp_path}/isession/config.yml\n" in out
    assert "target        controller  (" in out and "resource      ctl  (" in out
    assert 'nginx_slug = "x"  (' in out and "(services.nginx)" in out
    assert cli.main(["config", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["exists"] and doc["target"] == "controller" and doc["sources"]["resource"].endswith("config.yml")
    assert doc["file"]["services"] == {"nginx": {"inputs": {"nginx_slug": "x"}}}


def test_start_takes_its_defaults_from_the_config_file(tmp_path, monkeypatch):
    """Without an inventory a configured cluster target is refused like --target compute would be."""
    env = _config(tmp_path, "target: compute\nresource: ctl\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ISESSION_INVENTORY", raising=False)
    monkeypatch.setenv("ISESSION_ROOT", str(tmp_path / "sessions"))
    from isession import collection, commands  # noqa: PLC0415

    monkeypatch.setattr(collection, "_active", None)  # this checkout (tests/conftest.py), not another test's copy
    with pytest.raises(UsageError, match="--target compute needs an inventory"):
        commands.cmd_start(cli.build_parser().parse_args(["start", "nginx"]))


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for code, _text in cli.EXIT_CODES:
        assert re.search(rf"^  {code} +\S", out, re.MULTILINE), code
    assert "register-python-argcomplete isession" in out


def test_every_command_takes_json():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    assert set(sub.choices) == set(cli.HANDLERS)
    for name, p in sub.choices.items():
        assert any("--json" in a.option_strings for a in p._actions), name  # noqa: SLF001


def test_an_existing_session_dir_is_named_and_a_missing_or_malformed_one_is_refused_by_its_id(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "plain").write_text("not a session")
    assert config.existing_session_dir(tmp_path, "s1") == tmp_path / "s1"
    for missing in ("s2", "plain"):
        with pytest.raises(UsageError, match=f"no session '{missing}' under {re.escape(str(tmp_path))}"):
            config.existing_session_dir(tmp_path, missing)
    with pytest.raises(UsageError, match="--id: '../s1' is not a session id"):
        config.existing_session_dir(tmp_path, "../s1")

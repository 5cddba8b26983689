"""InProcessModule (plugin_utils/_inprocess.py) against the real AnsibleModule, input for input.

Every case runs twice: once through ``InProcessModule`` in this process, once through ``AnsibleModule`` in a
fresh Python (args file, JSON on stdout, exactly how a shipped module runs). The same ``act`` function drives
both, so each assertion says "the in-process result is the one AnsibleModule gives", not a value written here.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import uuid
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _state
from ansible_collections.hpc.interactive.plugins.plugin_utils import _inprocess
from ansible_collections.hpc.interactive.plugins.plugin_utils._inprocess import InProcessModule, _ModuleExit

COLLECTIONS = str(Path(os.path.abspath(_state.__file__)).parents[5])
REPO = Path(COLLECTIONS) / "ansible_collections" / "hpc" / "interactive"
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "schedulers"
_spec = importlib.util.spec_from_file_location("fake_scheduler", FIXTURES / "fake_scheduler.py")
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)

NAME = "hpc.interactive.probe"
SECRET = "Xq7-hunter2-%s" % uuid.uuid4().hex[:6]
MASK = "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"


def act(module, plan):
    """What the module under test does; runs as is on both sides (its source is sent to the reference Python)."""
    result = dict(plan.get("result") or {})
    for name, required, opt_dirs in plan.get("bins", []):
        result.setdefault("found", []).append(module.get_bin_path(name, required=required, opt_dirs=opt_dirs))
    for text in plan.get("warn", []):
        module.warn(text)
    if plan.get("echo_params"):
        result["params_seen"] = dict(module.params)
        result["check_mode_seen"] = module.check_mode
    if plan.get("fail"):
        module.fail_json(**result)
    module.exit_json(**result)


REFERENCE = """
import json, os
from ansible.module_utils.basic import AnsibleModule
%s
spec = json.loads(os.environ["INPROCESS_REFERENCE_SPEC"])
act(AnsibleModule(argument_spec=spec["argument_spec"], **spec["options"]), spec["plan"])
""" % inspect.getsource(act)


def normalise(result: dict) -> dict:
    """JSON round trip; ``changed`` defaults to false (the task executor adds it to every result either way)."""
    result = json.loads(json.dumps(result))
    result.setdefault("changed", False)
    return result


def warning_texts(result: dict) -> list:
    """Warnings as text: AnsibleModule 2.19 sends WarningSummary objects, the worker accepts plain strings."""
    return [w["event"]["msg"] if isinstance(w, dict) else w for w in result.get("warnings", [])]


def reference(run_module, argument_spec: dict, params: dict, plan: dict, *, options: dict = None,
              check: bool = False) -> dict:
    """The real AnsibleModule's result for these inputs, run the way Ansible runs a shipped module."""
    spec = json.dumps({"argument_spec": argument_spec, "options": options or {}, "plan": plan})
    result = run_module("reference", dict(params, _ansible_module_name=NAME), check=check, code=REFERENCE,
                        env={"INPROCESS_REFERENCE_SPEC": spec}, timeout=60)
    result.pop("_rc")
    return result


def in_process(argument_spec: dict, params: dict, plan: dict, *, options: dict = None, check: bool = False) -> dict:
    options = dict(options or {})
    options.setdefault("supports_check_mode", False)
    try:
        module = InProcessModule(NAME, argument_spec, dict(params), check_mode=check, diff=False, **options)
        act(module, plan)
    except _ModuleExit as done:
        return done.result
    pytest.fail("InProcessModule returned without exit_json or fail_json")


def both(run_module, argument_spec, params, plan=None, *, options=None, check=False):
    plan = plan or {}
    ref = reference(run_module, argument_spec, params, plan, options=options, check=check)
    got = in_process(argument_spec, params, plan, options=options, check=check)
    return normalise(ref), normalise(got)


SPEC = dict(
    name=dict(type="str", required=True),
    mode=dict(type="str", choices=["fast", "slow"], default="fast"),
    count=dict(type="int", default=3),
    flag=dict(type="bool", default=False),
    where=dict(type="path"),
    items=dict(type="list", elements="int", default=[]),
    token=dict(type="str", no_log=True),
    token_path=dict(type="path"),
    queue=dict(type="str", aliases=["partition"]),
)
OPTIONS = dict(required_together=[["token", "token_path"]], supports_check_mode=True)


@pytest.mark.parametrize("params,expect_msg", [
    ({"name": "a", "bogus": 1, "other": "x"}, "Unsupported parameters for (%s) module: bogus, other." % NAME),
    ({"mode": "fast"}, "missing required arguments: name"),
    ({"name": "a", "mode": "medium"}, "value of mode must be one of: fast, slow, got: medium"),
    ({"name": "a", "token": SECRET}, "parameters are required together: token, token_path"),
    # the words after "of type" differ between ansible-core lines (2.18 and older: <class 'str'>); got == ref above
    ({"name": "a", "count": "many"}, "argument 'count' is of type "),
], ids=["unsupported", "missing-required", "bad-choice", "required-together", "bad-type"])
@pytest.mark.parametrize("check", [False, True], ids=["run", "check"])
def test_validation_failures_are_the_ones_ansiblemodule_gives(run_module, params, expect_msg, check):
    ref, got = both(run_module, SPEC, params, {"result": {"changed": True}}, options=OPTIONS, check=check)
    assert got == ref
    assert got["failed"] is True and got["msg"].startswith(expect_msg), got["msg"]
    assert SECRET not in json.dumps(got)  # the no_log value is masked in the invocation too


def test_defaults_and_conversions_are_applied(run_module):
    params = {"name": "a", "count": "5", "flag": "yes", "where": "~/x", "items": "1,2", "partition": "debug"}
    ref, got = both(run_module, SPEC, params, {"echo_params": True}, options=OPTIONS)
    assert got == ref
    seen = got["params_seen"]
    assert seen["mode"] == "fast" and seen["count"] == 5 and seen["flag"] is True and seen["items"] == [1, 2]
    assert seen["where"] == os.path.expanduser("~/x") and seen["queue"] == "debug" and seen["token"] is None
    assert got["invocation"]["module_args"] == seen


def test_no_log_values_are_masked_everywhere_in_the_result(tmp_path, run_module):
    params = {"name": "a", "token": SECRET, "token_path": str(tmp_path / "t")}
    result = {"changed": True, "msg": "token is %s!" % SECRET, "stdout": "line\n%s\n" % SECRET, "plain": "visible",
              "nested": {"list": ["x", SECRET, {"k": "<%s>" % SECRET}]}}
    for plan in ({"result": result}, {"result": result, "fail": True}):
        ref, got = both(run_module, SPEC, params, plan, options=OPTIONS)
        assert got == ref
        assert SECRET not in json.dumps(got)
        assert got["invocation"]["module_args"]["token"] == MASK and got["plain"] == "visible"
        assert got["nested"]["list"][1] == MASK


def test_warnings_are_returned(run_module):
    ref, got = both(run_module, SPEC, {"name": "a"}, {"warn": ["first", "second"]}, options=OPTIONS)
    assert warning_texts(got) == warning_texts(ref) == ["first", "second"]
    assert {k: v for k, v in got.items() if k != "warnings"} == {k: v for k, v in ref.items() if k != "warnings"}


def test_alias_and_option_both_set_warns_in_the_result_like_ansiblemodule(run_module):
    """AnsibleModule returns the validator's warning in the result; the registered result should hold it too."""
    ref, got = both(run_module, SPEC, {"name": "a", "queue": "q1", "partition": "q2"}, {}, options=OPTIONS)
    assert warning_texts(ref) == ["Both option queue and its alias partition are set."]
    assert warning_texts(got) == warning_texts(ref)


def test_check_mode_with_a_module_not_supporting_it_is_skipped(run_module):
    plan = {"result": {"changed": True, "msg": "ran"}}
    ref, got = both(run_module, SPEC, {"name": "a"}, plan, options={"supports_check_mode": False}, check=True)
    assert got == ref
    assert got["skipped"] is True and got["msg"] == "remote module (%s) does not support check mode" % NAME
    # with support the module runs and sees check mode
    ref, got = both(run_module, SPEC, {"name": "a"}, {"echo_params": True}, options=OPTIONS, check=True)
    assert got == ref and got["check_mode_seen"] is True and "skipped" not in got


def _paths(tmp_path: Path) -> dict:
    base = tmp_path / "things"
    base.mkdir()
    (base / "file").write_text("12345")
    (base / "file").chmod(0o640)
    (base / "dir").mkdir(mode=0o750)
    (base / "dir").chmod(0o750)
    (base / "hard").write_text("ab")
    os.link(base / "hard", base / "hard2")
    (base / "link").symlink_to(base / "file")
    (base / "dangling").symlink_to(base / "nowhere")
    return {name: str(base / name) for name in ("file", "dir", "hard", "link", "dangling", "missing")}


@pytest.mark.parametrize("which", ["file", "dir", "hard", "link", "missing"])
@pytest.mark.parametrize("key", ["path", "dest"])
def test_path_info_is_added_like_ansiblemodule(tmp_path, which, key, run_module):
    path = _paths(tmp_path)[which]
    ref, got = both(run_module, SPEC, {"name": "a"}, {"result": {key: path}}, options=OPTIONS)
    assert got == ref
    expect_state = {"file": "file", "dir": "directory", "hard": "hard", "link": "link"}.get(which)
    assert got.get("state") == expect_state
    if which == "file":
        st = os.stat(path)
        assert got["mode"] == "0640" and got["size"] == 5 and (got["uid"], got["gid"]) == (st.st_uid, st.st_gid)


def test_path_info_for_a_dangling_symlink_is_what_ansiblemodule_gives(tmp_path, run_module):
    """AnsibleModule.add_path_info tests os.path.exists (follows the link): a dangling link gets no info."""
    path = _paths(tmp_path)["dangling"]
    ref, got = both(run_module, SPEC, {"name": "a"}, {"result": {"path": path}}, options=OPTIONS)
    assert "state" not in ref
    assert got == ref


def test_path_info_prefers_path_over_dest(tmp_path, run_module):
    paths = _paths(tmp_path)
    ref, got = both(run_module, SPEC, {"name": "a"}, {"result": {"path": paths["dir"], "dest": paths["file"]}},
                    options=OPTIONS)
    assert got == ref and got["state"] == "directory"


def test_get_bin_path_found_not_found_and_required(tmp_path, run_module):
    tools = tmp_path / "tools"
    tools.mkdir()
    tool = tools / ("hpc-ip-tool-%s" % uuid.uuid4().hex[:6])
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    missing = "hpc-ip-missing-%s" % uuid.uuid4().hex[:6]
    plan = {"bins": [[tool.name, False, [str(tools)]], [missing, False, []]]}
    ref, got = both(run_module, SPEC, {"name": "a"}, plan, options=OPTIONS)
    assert got == ref and got["found"] == [str(tool), None]
    plan = {"bins": [[tool.name, True, [str(tools)]], [missing, True, []]], "result": {"changed": True}}
    ref, got = both(run_module, SPEC, {"name": "a"}, plan, options=OPTIONS)
    assert got == ref
    assert got["failed"] is True and missing in got["msg"] and "found" not in got


def test_module_exit_is_not_stopped_by_except_exception():
    """A module's ``except Exception`` around exit_json must not swallow the exit (SystemExit in a real module)."""
    module = InProcessModule(NAME, SPEC, {"name": "a"}, check_mode=False, diff=False, **OPTIONS)
    with pytest.raises(_ModuleExit) as done:
        try:
            module.exit_json(changed=True)
        except Exception:  # noqa: BLE001 - what a careless module might do
            pytest.fail("exit_json was caught by except Exception")
    assert done.value.result["changed"] is True


# actions with nothing to run on a host: their module file is documentation only (checked below)
ACTION_ONLY = ("warm_connection",)
ACTIONS = sorted(p.stem for p in (REPO / "plugins" / "action").glob("*.py") if p.stem not in ACTION_ONLY)


@pytest.mark.parametrize("module_name", ACTION_ONLY)
def test_action_only_plugins_are_documented_and_run_nothing_on_a_host(module_name):
    action = importlib.import_module("ansible_collections.hpc.interactive.plugins.action." + module_name)
    assert not issubclass(action.ActionModule, _inprocess.InProcessAction)
    mod = importlib.import_module(_inprocess.MODULES_PACKAGE + module_name)
    assert f"module: {module_name}" in mod.DOCUMENTATION and mod.EXAMPLES and mod.RETURN
    assert not hasattr(mod, "main") and not hasattr(mod, "run_module")


@pytest.mark.parametrize("module_name", ACTIONS)
def test_each_action_runs_a_module_with_the_in_process_interface(module_name):
    action = importlib.import_module("ansible_collections.hpc.interactive.plugins.action." + module_name)
    assert issubclass(action.ActionModule, _inprocess.InProcessAction)
    assert action.ActionModule.MODULE == module_name
    mod = importlib.import_module(_inprocess.MODULES_PACKAGE + module_name)
    assert isinstance(mod.ARGUMENT_SPEC, dict) and isinstance(mod.MODULE_OPTIONS, dict)
    assert callable(mod.run_module)


@pytest.mark.parametrize("module_name", ACTIONS)
def test_real_modules_refuse_bad_input_the_same_way_in_process(tmp_path, module_name, run_module):
    """Each module's own spec: an unknown option (and no required one), then no options at all, both ways."""
    mod = importlib.import_module(_inprocess.MODULES_PACKAGE + module_name)
    harness = fake.Harness(tmp_path, run_module)
    full_name = "hpc.interactive." + module_name
    for params in ({"hpc_no_such_option": 1}, {}):
        shipped = harness.run_module(module_name, dict(params, _ansible_module_name=full_name))
        shipped.pop("_rc")
        with pytest.raises(_ModuleExit) as done:  # run_module must not return without a result
            module = InProcessModule(full_name, mod.ARGUMENT_SPEC, dict(params), check_mode=False, diff=False,
                                     **mod.MODULE_OPTIONS)
            mod.run_module(module)
        got = done.value.result
        assert normalise(got) == normalise(shipped)
        assert got["failed"] is True
    assert harness.calls() == []

"""The test ``hpc.interactive.plain_command``: a plain path or command name, one rule for the roles and the filter.

The table is what the rule takes and refuses; the filter ``vnc_input_errors`` holds the same pattern object and
agrees on every row; and the rstudio, matlab and nicedcv spec tasks give their messages for what the test refuses,
run through ansible-playbook (a real templar) on a local connection.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.hpc.interactive.plugins.filter import vnc_input_errors
from ansible_collections.hpc.interactive.plugins.plugin_utils import _plain
from ansible_collections.hpc.interactive.plugins.test import plain_command

REPO = Path(__file__).resolve().parents[4]
COLLECTIONS = REPO / ".cache" / "collections"  # tests/conftest.py links the checkout there
# ansible-playbook beside this Python (a venv), else the same CLI by module (ansible-test's units venv has no scripts)
_BESIDE = Path(sys.executable).parent / "ansible-playbook"
PLAYBOOK = [str(_BESIDE)] if _BESIDE.exists() else [sys.executable, "-m", "ansible.cli.playbook"]

ACCEPTED = ["Xvnc", "R", "/usr/bin/rserver", "/opt/MATLAB/R2024a/bin/matlab", "x-term_1.2+b", "./bin/x", "../x",
            "/", ".hidden", "_x", "+x", "a--b", "C++"]
REFUSED = ["-rf", "--help", "-", "a b", " x", "x ", "a;b", "$(x)", "${x}", "`x`", "a|b", "a&b", "a>b", "a<b",
           "~/bin/x", "~", "'x'", '"x"', "a\\b", "a*b", "a?b", "a=b", "a:b", "a,b", "a@b", "a%b", "é", "",
           "x\n", "\nx", "a\nb", "x\r", "x\t", "x\x00", None, 5, 5.0, True, ["x"], ("x",), {"x": 1}, b"x"]
TABLE = [(value, True) for value in ACCEPTED] + [(value, False) for value in REFUSED]


def plain(value) -> bool:
    return plain_command.TestModule().tests()["plain_command"](value)


@pytest.mark.parametrize(("value", "ok"), TABLE)
def test_the_table(value, ok):
    assert plain(value) is ok


def test_the_filter_uses_the_same_pattern_object():
    assert vnc_input_errors.PLAIN is _plain.PLAIN
    assert plain_command.TestModule().tests()["plain_command"] is _plain.is_plain


@pytest.mark.parametrize(("value", "ok"), TABLE)
def test_the_filter_agrees_on_every_row(value, ok):
    good = {"vnc_geometry": "1280x800", "vnc_depth": 24, "vnc_display": 0, "vnc_display_range": "1-99",
            "vnc_desktops": ["twm"], "vnc_xvnc_extra_args": [], "_vnc_app_command": [], "_vnc_app_field": "",
            **{field: "/usr/bin/x" for field in vnc_input_errors.PATH_FIELDS}}
    found = vnc_input_errors.input_errors(dict(good, vnc_xvnc_executable=value), {"twm": ["twm"]})
    assert found == ([] if ok else ["vnc_xvnc_executable must be a plain path or command name"])
    if isinstance(value, str):  # the app's first word: the same rule (what is not a string is str()-ed first there)
        assert vnc_input_errors.app_command_ok([value, "-x"]) is ok


PLAY = """- name: The test through Ansible's templar, and the spec tasks that use it
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Select and reject with the test
      ansible.builtin.copy:
        content: >-
          {{{{ {{'selected': values | select('hpc.interactive.plain_command') | list,
               'rejected': values | reject('hpc.interactive.plain_command') | list,
               'is': values[0] is hpc.interactive.plain_command,
               'is_not': values[0] is not hpc.interactive.plain_command}} | to_json }}}}
        dest: "{out}/select.json"
        mode: "0600"
{roles}"""
ROLE = """    - name: Describe {role}
      ansible.builtin.include_role:
        name: hpc.interactive.{role}
      vars: {inputs}
    - name: Save the {role} spec's input errors
      ansible.builtin.copy:
        content: "{{{{ session_service_spec.input_errors | to_json }}}}"
        dest: "{out}/{role}.json"
        mode: "0600"
"""
BAD = {
    "rstudio": {"rstudio_rserver_executable": "-rf", "rstudio_r_executable": "R --vanilla"},
    "matlab": {"matlab_mode": "proxy", "matlab_executable": "$(x)", "matlab_proxy_executable": "~/bin/x"},
    "nicedcv": {"nicedcv_openssl_executable": "openssl;id"},
}


def test_through_ansible_the_test_and_the_spec_tasks(tmp_path):
    """One playbook: select/reject and is/is not on the table, then each role's messages for refused executables."""
    values = [v for v in (*ACCEPTED, *REFUSED) if not isinstance(v, (bytes, tuple, float))]  # what JSON holds
    roles = "".join(ROLE.format(role=role, inputs=json.dumps(inputs), out=tmp_path) for role, inputs in BAD.items())
    (tmp_path / "play.yml").write_text(PLAY.format(out=tmp_path, roles=roles))
    (tmp_path / "extra.json").write_text(json.dumps({"values": values}))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    cp = subprocess.run([*PLAYBOOK, "-i", "localhost,", str(tmp_path / "play.yml"), "-e", f"@{tmp_path / 'extra.json'}",
                         "-e", "ansible_python_interpreter=" + sys.executable],
                        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path, check=False)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-2000:]
    got = json.loads((tmp_path / "select.json").read_text())
    assert got == {"selected": [v for v in values if plain(v)], "rejected": [v for v in values if not plain(v)],
                   "is": True, "is_not": False}
    assert json.loads((tmp_path / "rstudio.json").read_text()) == [
        "rstudio_rserver_executable must be a plain path or command name",
        "rstudio_r_executable must be a plain path or command name"]
    assert json.loads((tmp_path / "matlab.json").read_text()) == [
        "matlab_executable must be a plain path or command name",
        "matlab_proxy_executable must be a plain path or command name"]
    assert json.loads((tmp_path / "nicedcv.json").read_text()) == [
        "nicedcv_dcv_executable, nicedcv_nginx_executable and nicedcv_openssl_executable must be plain paths"]

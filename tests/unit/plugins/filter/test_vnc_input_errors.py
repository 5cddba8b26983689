"""The vnc role's input checks (``hpc.interactive.vnc_input_errors``): each refused input named, never its value."""
from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.hpc.interactive.plugins.filter.vnc_input_errors import (
    PATH_FIELDS,
    FilterModule,
    input_errors,
)

DESKTOPS = {"xfce4": ["startxfce4"], "mate": ["mate-session"], "twm": ["twm"]}
GOOD = {
    "vnc_geometry": "1280x800", "vnc_depth": 24, "vnc_display": 0, "vnc_display_range": "1-99",
    "vnc_desktops": ["xfce4", "mate"], "vnc_xvnc_extra_args": ["-dpi", "96"], "_vnc_app_command": [],
    "_vnc_app_field": "", **{field: "/usr/bin/x" for field in PATH_FIELDS},
}


def errors(**changes):
    return input_errors(dict(GOOD, **changes), DESKTOPS)


def test_good_inputs_have_no_error():
    assert errors() == []
    assert errors(vnc_depth="16", vnc_display="7", vnc_display_range="5", vnc_geometry="320x200") == []
    assert errors(vnc_geometry="8192x8192", vnc_xvnc_extra_args=[], vnc_python="python3") == []
    assert errors(_vnc_app_command=["xterm", "-fa", "Monospace 12"], _vnc_app_field="desktop_app_command") == []


@pytest.mark.parametrize(("field", "value"), [
    ("vnc_geometry", "319x200"), ("vnc_geometry", "1280x199"), ("vnc_geometry", "8193x800"),
    ("vnc_geometry", "1280x800; rm -rf ~"), ("vnc_geometry", "1280X800"), ("vnc_geometry", 1280),
    ("vnc_geometry", "1280x800\n"),
    ("vnc_depth", 8), ("vnc_depth", "24 "),
    ("vnc_display", "-1"), ("vnc_display", "1000"), ("vnc_display", ":1"),
    ("vnc_display_range", "0-9"), ("vnc_display_range", "1-1000"), ("vnc_display_range", "1-9;x"),
    ("vnc_desktops", []), ("vnc_desktops", "xfce4"), ("vnc_desktops", ["xfce4", "kde"]),
    ("vnc_desktops", [["xfce4"]]), ("vnc_desktops", {"xfce4": 1}),
    ("vnc_xvnc_executable", "-fp /tmp"), ("vnc_python", "python3 -c x"), ("vnc_novnc_dir", "/usr/share/novnc\n"),
    ("vnc_websockify_executable", ["/usr/bin/websockify"]), ("vnc_xauth_executable", "$(id)"),
    ("vnc_xvnc_extra_args", ["-dpi", "96; touch /tmp/x"]), ("vnc_xvnc_extra_args", "-dpi 96"),
    ("vnc_xvnc_extra_args", ["`id`"]), ("vnc_xvnc_extra_args", ["a\nb"]),
])
def test_each_bad_input_is_refused_by_its_name_and_never_repeated(field, value):
    found = errors(**{field: value})
    assert len(found) == 1 and found[0].startswith(field + " must "), found
    if isinstance(value, str) and len(value) > 3 and value not in DESKTOPS:  # the desktops' names are the rule
        assert value not in found[0]


@pytest.mark.parametrize("argv", [[], "xterm", ["-e", "x"], ["xterm", "-e", "a;b"], ["x\nterm"], ["$(id)"], None])
def test_a_bad_app_command_is_refused_by_the_input_that_named_it(argv):
    found = errors(_vnc_app_command=argv, _vnc_app_field="desktop_app_command")
    assert [m.split(" ", 1)[0] for m in found] == ["desktop_app_command"], found
    assert "non-empty argv list" in found[0]


def test_every_refused_input_is_named_in_order():
    found = errors(vnc_geometry="big", vnc_depth=1, vnc_desktops=["kde"], vnc_xvnc_executable="-x",
                   _vnc_app_command=["-x"], _vnc_app_field="matlab_executable")
    assert [m.split(" ", 1)[0] for m in found] == ["vnc_geometry", "vnc_depth", "vnc_desktops",
                                                   "vnc_xvnc_executable", "matlab_executable"]
    assert found[2] == "vnc_desktops must be a non-empty list of xfce4, mate, twm"


def test_the_filter_refuses_what_is_not_a_dictionary():
    refuse = FilterModule().filters()["vnc_input_errors"]
    assert refuse(GOOD, DESKTOPS) == []
    with pytest.raises(AnsibleFilterError, match="must be dictionaries"):
        refuse(["vnc_geometry"], DESKTOPS)

from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _service_file as sf
from ansible_collections.hpc.interactive.plugins.module_utils._service_file import ServiceFileError

HOSTILE_SHELL = ["a;b", "$(id)", "`id`", "a|b", "a&&b", "-rf", "a\nb", "a b", "a\tb"]


# ---------------------------------------------------------------------------- port
@pytest.mark.parametrize(
    "value, expected",
    [(8080, "8080"), ("56321", "56321"), (1, "1"), (65535, "65535"), ("65535", "65535"), ("08080", "8080")],
)
def test_port_accepted_and_written_as_digit_string(value, expected):
    assert sf.validate_port(value) == expected


@pytest.mark.parametrize(
    "value",
    [0, "0", 65536, "65536", -1, "-1", "12a", "", " 80", "80 ", "80\n", "+80", "1e3", "0x50", "123456",
     True, False, 80.0, None, [80], {"p": 80}, "\u0661\u0662", *HOSTILE_SHELL],
)
def test_port_refused(value):
    with pytest.raises(ServiceFileError) as exc:
        sf.validate_port(value)
    assert exc.value.field == "port"
    assert exc.value.msg.startswith("port ")


# ---------------------------------------------------------------------------- url
@pytest.mark.parametrize("value", ["/me", "/sme"])
def test_url_accepted(value):
    assert sf.validate_url(value) == value


@pytest.mark.parametrize("value", ["/ME", "me", "/me/", "/me\n", "/sme;", "", None, 1, "/me$(id)", "https://x/me"])
def test_url_refused(value):
    with pytest.raises(ServiceFileError) as exc:
        sf.validate_url(value)
    assert exc.value.field == "url"


# ---------------------------------------------------------------------------- slug
@pytest.mark.parametrize(
    "value",
    [
        "",
        "lab",
        "lab/tree/work/x.ipynb",
        "vnc.html?autoconnect=1&resize=remote&path=me/5000/websockify",
        "?folder=/home/cluser/project",
        "#view=1",
        "a%20b",
        "notebooks/~user/a..b/c.d",
        "lab/",
        "x:y@z,w+v",
    ],
)
def test_slug_accepted(value):
    assert sf.validate_slug(value) == value


@pytest.mark.parametrize(
    "value, why",
    [
        ("lab\n", "characters"),
        ("lab\r", "characters"),
        ("a\x00b", "characters"),
        ("a\x1bb", "characters"),
        ("a b", "characters"),
        ("\t", "characters"),
        ("a;b", "characters"),
        ("$(id)", "characters"),
        ("`id`", "characters"),
        ("a|b", "characters"),
        ("a'b", "characters"),
        ('a"b', "characters"),
        ("a\\b", "characters"),
        ("a<b>", "characters"),
        ("caf\u00e9", "characters"),
        ("/lab", "start"),
        ("-rf", "start"),
        ("--help", "start"),
        ("../etc/passwd", "segments"),
        ("a/../b", "segments"),
        ("a/./b", "segments"),
        ("..", "segments"),
        ("a/%2e%2e/b", "segments"),
        ("a/%2E%2E", "segments"),
        ("%2Fetc", "encoded"),
        ("%zz", "hex digits"),
        ("a%", "hex digits"),
        ("a%0a", "control"),
        ("a%5cb", "control"),
        ("vnc.html?password=x", "secret"),
        ("?token=abc", "secret"),
        ("lab?a=1&api_key=1", "secret"),
        ("#password=x", "secret"),
        ("vnc.html?autoconnect=1#PassWord=x", "secret"),
        ("?%74oken=x", "secret"),  # percent-encoded "token"
        ("?auth=x", "secret"),
        ("?password=Ab3_-xYz", "secret"),  # a VNC password, but in the query
        ("#password=Ab3_-xYz9", "secret"),  # not the 8 characters of a VNC password
        ("#password=Ab3_-xYz&token=x", "secret"),
        ("x" * (sf.MAX_SLUG + 1), "longer"),
    ],
)
def test_slug_refused(value, why):
    with pytest.raises(ServiceFileError) as exc:
        sf.validate_slug(value)
    assert exc.value.field == "slug"
    assert why in exc.value.msg


@pytest.mark.parametrize("value", ["#password=Ab3_-xYz", "vnc.html?autoconnect=1#password=Ab3_-xYz"])
def test_slug_may_hold_a_vnc_password_in_its_fragment(value):
    """The desktop opt-in (vnc_password_in_url): 8 characters, only in the fragment, never sent to a server."""
    assert sf.validate_slug(value) == value


@pytest.mark.parametrize("value", [5, ["lab"], {"a": 1}, b"lab"])
def test_slug_wrong_type(value):
    with pytest.raises(ServiceFileError, match="slug must be a string"):
        sf.validate_slug(value)


# ---------------------------------------------------------------------------- job status
@pytest.mark.parametrize("value", ["Submitting", "Queued", "Starting", "Running", "Cancelled", "Completed", "Failed"])
def test_job_status_accepted(value):
    assert sf.validate_job_status(value) == value


@pytest.mark.parametrize("value", ["running", "RUNNING", "Done", "PENDING", "", None, 1, "Running\n", "Running;"])
def test_job_status_refused(value):
    with pytest.raises(ServiceFileError) as exc:
        sf.validate_job_status(value)
    assert exc.value.field == "job_status"


# ---------------------------------------------------------------------------- error message
@pytest.mark.parametrize(
    "value, expected",
    [
        ("", ""),
        (None, ""),
        ("walltime 01:00:00 reached", "walltime 01:00:00 reached"),
        ("line1\nline2", "line1\nline2"),
        ("line1\r\nline2\rline3", "line1\nline2\nline3"),
        ("a\tb", "a b"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00here", "nul\\x00here"),
        ("c1\x85", "c1\\x85"),
        ("$(id) `id` ; -rf", "$(id) `id` ; -rf"),  # data, not code: kept verbatim, JSON-escaped on disk
        ("Ünïcode ✓", "Ünïcode ✓"),
    ],
)
def test_error_message_cleaned(value, expected):
    cleaned = sf.clean_message(value)
    assert cleaned == expected
    assert sf.clean_message(cleaned) == cleaned  # a fixed point: rewriting is idempotent


def test_error_message_truncated():
    cleaned = sf.clean_message("x" * (sf.MAX_MESSAGE + 100))
    assert len(cleaned) == sf.MAX_MESSAGE
    assert cleaned.endswith(sf.TRUNCATED)
    assert sf.clean_message(cleaned) == cleaned


@pytest.mark.parametrize("value", [5, ["x"], {"m": 1}, "lone \ud800 surrogate"])
def test_error_message_refused(value):
    with pytest.raises(ServiceFileError) as exc:
        sf.clean_message(value)
    assert exc.value.field == "error_message"


# ---------------------------------------------------------------------------- extra
def test_extra_accepts_json_values():
    extra = {"NODE": "compute1", "N": 3, "F": 1.5, "L": [1, "a"], "D": {"k": None}, "B": True, "GONE": None}
    assert sf.validate_extra(extra) == extra


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"URL": "/me"}, "collides"),
        ({"url": "/me"}, "collides"),
        ({"Job_Status": "x"}, "collides"),
        ({"error_message": "x"}, "collides"),
        ({"": 1}, "non-empty"),
        ({"a\nb": 1}, "non-empty"),
        ({1: "x"}, "non-empty"),
        ({"X": float("nan")}, "JSON"),
        ({"X": float("inf")}, "JSON"),
        ({"X": {1, 2}}, "JSON"),
        ({"X": object()}, "JSON"),
        ({"X": b"bytes"}, "JSON"),
        ({"X": "\ud800"}, "JSON"),
        (["X"], "dictionary"),
    ],
)
def test_extra_refused(extra, fragment):
    with pytest.raises(ServiceFileError) as exc:
        sf.validate_extra(extra)
    assert exc.value.field == "extra"
    assert fragment in exc.value.msg


# ---------------------------------------------------------------------------- validate (all fields)
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"port": "12a"}, "port"),
        ({"url": "/x"}, "url"),
        ({"slug": "$(id)"}, "slug"),
        ({"job_status": "Done"}, "job_status"),
        ({"error_message": 3}, "error_message"),
        ({"extra": {"PORT": 1}}, "extra"),
    ],
)
def test_validate_names_the_bad_field(kwargs, field):
    with pytest.raises(ServiceFileError) as exc:
        sf.validate(**kwargs)
    assert exc.value.field == field


def test_validate_returns_only_given_keys():
    assert sf.validate(port=8080, job_status="Queued") == {"PORT": "8080", "JOB_STATUS": "Queued"}
    assert sf.validate() == {}
    assert sf.validate(slug="", error_message="") == {"SLUG": "", "ERROR_MESSAGE": ""}


# ---------------------------------------------------------------------------- merge
BASE = {"URL": "/me", "PORT": "5000", "SLUG": "lab", "JOB_STATUS": "Queued", "ERROR_MESSAGE": "Resources",
        "NODE": "compute1"}


def test_merge_keeps_keys_not_given():
    out = sf.merge(BASE, {"SLUG": "tree"})
    assert out == dict(BASE, SLUG="tree")


def test_merge_status_change_resets_message_unless_given():
    assert sf.merge(BASE, {"JOB_STATUS": "Starting"})["ERROR_MESSAGE"] == ""
    assert sf.merge(BASE, {"JOB_STATUS": "Queued"})["ERROR_MESSAGE"] == "Resources"  # same status: kept
    out = sf.merge(BASE, {"JOB_STATUS": "Failed", "ERROR_MESSAGE": "node failure"})
    assert out["JOB_STATUS"] == "Failed" and out["ERROR_MESSAGE"] == "node failure"


def test_merge_fills_defaults_and_omits_unknown_url_port():
    out = sf.merge(None, {"JOB_STATUS": "Submitting"})
    assert out == {"SLUG": "", "JOB_STATUS": "Submitting", "ERROR_MESSAGE": ""}


def test_merge_running_needs_url_and_port():
    with pytest.raises(ServiceFileError) as exc:
        sf.merge(None, {"JOB_STATUS": "Running"})
    assert exc.value.field == "url" and "url and port" in exc.value.msg
    with pytest.raises(ServiceFileError) as exc:
        sf.merge({"URL": "/me"}, {"JOB_STATUS": "Running"})
    assert exc.value.field == "port"
    assert sf.merge(BASE, {"JOB_STATUS": "Running"})["JOB_STATUS"] == "Running"  # known from the file


def test_merge_extra_none_removes_and_new_extras_added():
    out = sf.merge(BASE, {"NODE": None, "JOBID": "42"})
    assert "NODE" not in out and out["JOBID"] == "42"
    assert BASE["NODE"] == "compute1"  # input not mutated


def test_merge_orders_keys():
    out = sf.merge({"Z": 1, "ERROR_MESSAGE": "", "A": 2, "JOB_STATUS": "Queued"}, {"PORT": "1", "URL": "/me"})
    assert list(out) == ["URL", "PORT", "SLUG", "JOB_STATUS", "ERROR_MESSAGE", "A", "Z"]


# ---------------------------------------------------------------------------- render / parse
def test_render_is_stable_pretty_and_ordered():
    shuffled = {"ZZ": [1], "ERROR_MESSAGE": "", "AA": "x", "JOB_STATUS": "Running", "SLUG": "lab", "PORT": "56321",
                "URL": "/sme"}
    text = sf.render(shuffled)
    assert text == (
        '{\n    "URL": "/sme",\n    "PORT": "56321",\n    "SLUG": "lab",\n    "JOB_STATUS": "Running",\n'
        '    "ERROR_MESSAGE": "",\n    "AA": "x",\n    "ZZ": [\n        1\n    ]\n}\n'
    )
    assert sf.render(dict(reversed(list(shuffled.items())))) == text
    assert sf.render(sf.parse(text)) == text


def test_render_escapes_hostile_message_as_json_data():
    content = sf.merge(None, {"ERROR_MESSAGE": sf.clean_message('say "hi"\n$(rm -rf ~) `x`\x07')})
    text = sf.render(content)
    assert len(text.splitlines()) == len(content) + 2  # the message's newline is escaped: one line per key
    assert json.loads(text)["ERROR_MESSAGE"] == 'say "hi"\n$(rm -rf ~) `x`\\x07'
    assert "ü" in sf.render({"ERROR_MESSAGE": "ü"})  # UTF-8, not \\u escapes


@pytest.mark.parametrize("text, fragment", [("{", "not valid JSON"), ("[]", "list"), ('"x"', "str"), ("", "JSON")])
def test_parse_refuses_non_objects(text, fragment):
    with pytest.raises(ServiceFileError) as exc:
        sf.parse(text, "/x/service.json")
    assert exc.value.field == "path" and fragment in exc.value.msg and "/x/service.json" in exc.value.msg


# ---------------------------------------------------------------------------- mode
@pytest.mark.parametrize("value, expected", [("0600", 0o600), ("600", 0o600), ("0644", 0o644), (0o640, 0o640),
                                             ("0700", 0o700), ("1600", 0o1600)])
def test_parse_mode(value, expected):
    assert sf.parse_mode(value) == expected


@pytest.mark.parametrize("value", ["u+rw", "0999", "0200", "0400", "", "60", True, 0o10000, None, "0600\n"])
def test_parse_mode_refused(value):
    with pytest.raises(ServiceFileError) as exc:
        sf.parse_mode(value)
    assert exc.value.field == "mode"


# ---------------------------------------------------------------------------- files
def _listing(directory):
    return sorted(os.listdir(directory))


def test_write_atomic_mode_and_no_temp_files(tmp_path):
    path = str(tmp_path / "service.json")
    old_umask = os.umask(0)
    try:
        sf.write_atomic(path, "one\n")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sf.write_atomic(path, "two\n", 0o640)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert open(path).read() == "two\n"
    assert _listing(tmp_path) == ["service.json"]


def test_write_atomic_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "service.json")
    sf.write_atomic(path, "old\n")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sf.os, "replace", boom)
    with pytest.raises(OSError):
        sf.write_atomic(path, "new\n")
    assert open(path).read() == "old\n"
    assert _listing(tmp_path) == ["service.json"]


def test_write_atomic_missing_directory(tmp_path):
    with pytest.raises(ServiceFileError) as exc:
        sf.write_atomic(str(tmp_path / "nope" / "service.json"), "x")
    assert exc.value.field == "path"


def test_read_service_file(tmp_path):
    path = tmp_path / "service.json"
    assert sf.read_service_file(str(path)) is None
    path.write_text('{"PORT": 8080, "JOB_STATUS": "Queued", "X": 1}')
    assert sf.read_service_file(str(path)) == {"PORT": "8080", "JOB_STATUS": "Queued", "X": 1}
    for bad in ("{not json", "[1]", '{"PORT": "abc"}', '{"JOB_STATUS": "Running"}'):
        path.write_text(bad)
        with pytest.raises(ServiceFileError) as exc:
            sf.read_service_file(str(path))
        assert exc.value.field == "path" and "force" in exc.value.msg
    path.write_bytes(b'{"SLUG": "\xff"}')
    with pytest.raises(ServiceFileError, match="UTF-8"):
        sf.read_service_file(str(path))


def test_plan_present_touches_nothing_then_apply_writes(tmp_path):
    path = str(tmp_path / "service.json")
    plan = sf.plan_present(path, sf.validate(url="/me", port=5000, job_status="Starting"))
    assert plan.changed and plan.before_text is None
    assert _listing(tmp_path) == []  # planning (check mode) wrote nothing
    sf.apply(plan)
    assert open(path).read() == plan.after_text
    again = sf.plan_present(path, sf.validate(port="5000", job_status="Starting"))
    assert not again.changed and again.after_text == again.before_text


def test_plan_present_mode_only_change(tmp_path):
    path = str(tmp_path / "service.json")
    sf.update_service_file(path, job_status="Queued")
    os.chmod(path, 0o644)
    plan = sf.plan_present(path, {}, mode=0o600)
    assert plan.mode_changed and not plan.content_changed and plan.old_mode == 0o644
    sf.apply(plan)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_corrupt_file_needs_force(tmp_path):
    path = tmp_path / "service.json"
    path.write_text("{garbage")
    with pytest.raises(ServiceFileError) as exc:
        sf.update_service_file(str(path), job_status="Queued")
    assert exc.value.field == "path"
    assert path.read_text() == "{garbage"  # untouched on error
    changed, content = sf.update_service_file(str(path), force=True, job_status="Queued")
    assert changed and content == {"SLUG": "", "JOB_STATUS": "Queued", "ERROR_MESSAGE": ""}
    assert json.loads(path.read_text()) == content


def test_invalid_value_leaves_file_untouched(tmp_path):
    path = tmp_path / "service.json"
    sf.update_service_file(str(path), url="/me", port=5000, job_status="Queued")
    before = path.read_bytes()
    for bad in ({"port": 0}, {"slug": "a\nb"}, {"job_status": "Done"}, {"url": "/x"}, {"extra": {"URL": 1}}):
        with pytest.raises(ServiceFileError):
            sf.update_service_file(str(path), **bad)
        assert path.read_bytes() == before
    assert _listing(tmp_path) == ["service.json"]


def test_absent_is_idempotent(tmp_path):
    path = str(tmp_path / "service.json")
    sf.update_service_file(path, job_status="Cancelled")
    plan = sf.plan_absent(path)
    assert plan.changed and plan.after_text is None and "Cancelled" in plan.before_text
    sf.apply(plan)
    assert not os.path.exists(path)
    second = sf.plan_absent(path)
    assert not second.changed
    sf.apply(second)


def test_update_service_file_round_trip(tmp_path):
    path = str(tmp_path / "service.json")
    changed, content = sf.update_service_file(path, url="/sme", port="56321", slug="lab", job_status="Running",
                                              extra={"NODE": "compute2"})
    assert changed
    assert sf.read_service_file(path) == content
    assert list(content) == ["URL", "PORT", "SLUG", "JOB_STATUS", "ERROR_MESSAGE", "NODE"]
    assert sf.update_service_file(path, port=56321, job_status="Running") == (False, content)


def _concurrent_writer(path, tag, count):
    for i in range(count):
        sf.update_service_file(path, job_status="Queued", extra={f"{tag}{i:03d}": i})


def test_concurrent_writers_lose_no_update(tmp_path):
    """Two processes merge different keys into one file at once: every key survives (the lock works)."""
    path = str(tmp_path / "service.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_concurrent_writer, args=(path, tag, 150)) for tag in ("A", "B")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        assert proc.exitcode == 0
    content = sf.read_service_file(path)
    assert sorted(k for k in content if k[0] in "AB") == [f"{t}{i:03d}" for t in "AB" for i in range(150)]
    assert _listing(tmp_path) == ["service.json"]


def test_absent_in_missing_directory_is_not_a_change(tmp_path):
    path = str(tmp_path / "nope" / "service.json")
    with sf.locked(path):
        plan = sf.plan_absent(path)
    assert not plan.changed


def test_update_with_expect_status_is_a_compare_and_set(tmp_path):
    path = str(tmp_path / "service.json")
    sf.update_service_file(path, url="/me", port=12345, job_status="Starting")
    sf.update_service_file(path, job_status="Running")  # session_ready wins the race
    with pytest.raises(ServiceFileError, match="changed to Running") as exc:
        sf.update_service_file(path, job_status="Starting", expect_status="Starting")
    assert exc.value.field == "job_status"
    assert sf.read_service_file(path)["JOB_STATUS"] == "Running"
    changed, content = sf.update_service_file(path, job_status="Queued", expect_status="Running")
    assert changed and content["JOB_STATUS"] == "Queued"

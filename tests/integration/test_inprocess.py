"""The workspace modules give the same results run inside the Ansible worker as shipped (plugin_utils/_inprocess).

One playbook drives session_state, service_json, free_port, session_ready and scheduler_submit (local) through
their normal cases, check and diff mode, bad input and a no_log secret, as ``wsuser`` on the bed's workspace over
the ``local`` connection - once in the worker (the default) and once shipped (``hpc_interactive_in_process:
false``). After the values that must differ between two runs (paths, ports, pids, times) are replaced by
placeholders, the two result lists are the same. ``-vvv`` shows which way each task went, and that the secret
is never printed either way.
"""
from __future__ import annotations

import json
import os
import re
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("bed")

PLAYBOOK = textwrap.dedent("""\
    - name: Exercise the workspace modules
      hosts: localhost
      gather_facts: false
      vars:
        ansible_pipelining: true
        root: "{{ tmp }}/root-{{ mode }}"
        sid: "ip-{{ mode }}"
        jobdir: "{{ root }}/{{ sid }}/job"
      tasks:
        - name: create
          hpc.interactive.session_state:
            op: create
            id: "{{ sid }}"
            root: "{{ root }}"
            service: nginx
            target: workspace
            url: /me
            watch: {inventory: /x/inventory.yml, resource: controller, walltime: "60"}
          register: r_create
        - name: create again
          hpc.interactive.session_state: {op: create, id: "{{ sid }}", root: "{{ root }}", service: nginx,
                                          watch: {inventory: /x/inventory.yml, resource: controller, walltime: "60"}}
          register: r_create2
        - name: update in check mode with diff
          hpc.interactive.session_state: {id: "{{ sid }}", root: "{{ root }}", step: starting, job_id: "7"}
          check_mode: true
          diff: true
          register: r_update_check
        - name: update
          hpc.interactive.session_state: {id: "{{ sid }}", root: "{{ root }}", step: starting, job_id: "7"}
          register: r_update
        - name: read
          hpc.interactive.session_state: {op: read, id: "{{ sid }}", root: "{{ root }}"}
          register: r_read
        - name: service.json
          hpc.interactive.service_json: {path: "{{ root }}/{{ sid }}/service.json", url: /me, port: 20001,
                                         job_status: Submitting}
          register: r_svc
        - name: service.json again, diff
          hpc.interactive.service_json: {path: "{{ root }}/{{ sid }}/service.json", job_status: Running}
          diff: true
          register: r_svc2
        - name: reserve a port
          hpc.interactive.free_port: {owner: "{{ sid }}", port_range: "21000-21999"}
          register: r_port
        - name: reserve it again
          hpc.interactive.free_port: {owner: "{{ sid }}", port_range: "21000-21999"}
          register: r_port2
        - name: nothing answers on the port
          hpc.interactive.session_ready: {port: "{{ r_port.port }}", timeout: 0.5, interval: 0.1}
          register: r_ready
          ignore_errors: true
        - name: submit a local job with a secret
          hpc.interactive.scheduler_submit:
            scheduler: local
            job_name: "isession-{{ sid }}"
            script: "sleep 300"
            workdir: "{{ jobdir }}"
            script_path: "{{ jobdir }}/agent.sh"
            secret: "{{ secret }}"
            secret_path: "{{ jobdir }}/secret"
          register: r_submit
        - name: submit again (the job is alive)
          hpc.interactive.scheduler_submit: {scheduler: local, job_name: "isession-{{ sid }}", script: "sleep 300",
                                             workdir: "{{ jobdir }}", secret: "{{ secret }}",
                                             secret_path: "{{ jobdir }}/secret"}
          register: r_submit2
        - name: cancel it
          hpc.interactive.scheduler_submit: {scheduler: local, state: absent, job_name: "isession-{{ sid }}"}
          register: r_cancel
        - name: release the port
          hpc.interactive.free_port: {owner: "{{ sid }}", state: absent}
          register: r_release
        - name: tombstone
          hpc.interactive.session_state: {op: cancel, id: "{{ sid }}", root: "{{ root }}"}
          register: r_tomb
        - name: unknown option
          hpc.interactive.session_state: {id: "{{ sid }}", root: "{{ root }}", bogus: 1}
          register: r_bad_unknown
          ignore_errors: true
        - name: bad choice
          hpc.interactive.service_json: {path: "{{ root }}/x.json", job_status: Sleeping}
          register: r_bad_choice
          ignore_errors: true
        - name: missing required option
          hpc.interactive.session_ready: {timeout: 1}
          register: r_bad_missing
          ignore_errors: true
        - name: secret without its path
          hpc.interactive.scheduler_submit: {scheduler: local, job_name: x, script: "true", secret: "{{ secret }}"}
          register: r_bad_together
          ignore_errors: true
        - name: a module's own refusal
          hpc.interactive.session_state: {id: "../etc", root: "{{ root }}"}
          register: r_bad_id
          ignore_errors: true
        - name: save the results
          ansible.builtin.copy:
            dest: "{{ tmp }}/results-{{ mode }}.json"
            mode: "0600"
            content: >-
              {{ [r_create, r_create2, r_update_check, r_update, r_read, r_svc, r_svc2, r_port, r_port2, r_ready,
              r_submit, r_submit2, r_cancel, r_release, r_tomb, r_bad_unknown, r_bad_choice, r_bad_missing,
              r_bad_together, r_bad_id] | to_json }}
    """)

OUR_TASKS = 20  # tasks above that use this collection's modules


def normalise(value: Any, subs: list[tuple[str, str]]) -> Any:
    """Replace what must differ between two runs: numbers (ports, pids, times, sizes) and run-specific names."""
    if isinstance(value, dict):
        return {k: normalise(v, subs) for k, v in value.items() if k not in {"uid", "gid"}}
    if isinstance(value, list):
        return [normalise(v, subs) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return 0
    if isinstance(value, str):
        for old, new in subs:
            value = value.replace(old, new)
        return re.sub(r"\d+", "N", value)
    return value


def run(bed, tmp: Path, mode: str, secret: str) -> tuple[list, str]:
    cp = bed.ansible_playbook(PLAYBOOK, extra_vars={"tmp": str(tmp), "mode": mode, "secret": secret,
                                                    "hpc_interactive_in_process": mode == "inproc"},
                              verbosity=3)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-2000:]
    return json.loads((tmp / f"results-{mode}.json").read_text()), cp.stdout + cp.stderr


def test_same_results_in_the_worker_and_shipped(bed) -> None:
    tmp = bed.user_tmpdir("wsuser")
    secrets = {"inproc": "Sx-inproc-7f3a9c1e5b", "shipped": "Sx-shipped-2d8e4a6c0f"}
    results, logs = {}, {}
    for mode in ("inproc", "shipped"):
        results[mode], logs[mode] = run(bed, tmp, mode, secrets[mode])

    # which way each task went
    assert logs["inproc"].count("run in the Ansible worker") == OUR_TASKS
    assert "run in the Ansible worker" not in logs["shipped"]
    assert "AnsiballZ_session_state" in logs["shipped"] or "Pipelining is enabled" in logs["shipped"]

    # the secret: never printed, masked in the results, written 0600 in a 0700 directory
    for mode in ("inproc", "shipped"):
        assert secrets[mode] not in logs[mode]
        assert secrets[mode] not in json.dumps(results[mode])
        jobdir = tmp / f"root-{mode}" / f"ip-{mode}" / "job"
        assert (jobdir / "secret").read_text() == secrets[mode]
        assert stat.S_IMODE(os.stat(jobdir / "secret").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(jobdir).st_mode) == 0o700
        assert json.loads((tmp / f"root-{mode}" / f"ip-{mode}" / "watch.json").read_text())["resource"] == "controller"

    subs = {mode: [(str(tmp), "<tmp>"), (mode, "<mode>"), (secrets[mode], "<secret>")] for mode in secrets}
    inproc = normalise(results["inproc"], subs["inproc"])
    shipped = normalise(results["shipped"], subs["shipped"])
    assert len(inproc) == len(shipped) == OUR_TASKS
    for i, (a, b) in enumerate(zip(inproc, shipped, strict=True)):
        assert a == b, f"task {i}: worker {json.dumps(a, sort_keys=True)}\nshipped {json.dumps(b, sort_keys=True)}"

    # and the results say what they should (so equal does not mean equally wrong)
    r = results["inproc"]
    assert r[0]["changed"] and not r[1]["changed"]                  # create, create again
    assert r[2]["changed"] and "diff" in r[2]                        # check mode predicts, with diff
    assert r[4]["record"]["step"] == "starting"                      # read after the real update
    assert r[9]["failed"] and r[9]["msg"].startswith("no answer from the server after"), r[9]
    assert r[10]["changed"] and r[10]["workdir"].endswith("/job") and not r[11]["changed"]
    assert r[12]["changed"] and r[13]["released"] == [r[7]["port"]]
    assert "Unsupported parameters for (hpc.interactive.session_state) module: bogus" in r[15]["msg"]
    assert "job_status" in r[16]["msg"] and "Sleeping" in r[16]["msg"]
    assert "missing required arguments: port" in r[17]["msg"]
    assert "parameters are required together: secret, secret_path" in r[18]["msg"]
    assert r[19]["failed"] and r[19]["field"] == "id"

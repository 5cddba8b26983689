# Copyright (c) hpc.interactive contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run one of this collection's workspace modules inside the Ansible worker instead of shipping it.

The session steps that touch only the workspace (the session record, service.json, port reservations, the
readiness wait, the local agent) run on ``localhost`` over the ``local`` connection as the user who runs
Ansible. Shipping such a module costs about half a second per task (building the AnsiballZ payload, a new Python
that imports ``ansible.module_utils.basic``, parsing its output), which is most of a session's start and cancel
time. When the task's connection is ``local`` without ``become``, ``async`` or a task ``environment``, the action
plugin of the same name runs the module's own class here instead: the same argument spec (validated with
``ArgumentSpecValidator``, the validator ``AnsibleModule`` uses), the same code, the same result, check and diff
mode; ``no_log`` values are removed from the result the way ``AnsibleModule`` does. In every other case (a remote
host, ``become``, ...) the module is shipped as usual. The variable ``hpc_interactive_in_process: false`` forces
shipping (the tests run both ways and compare).

The pattern follows community.crypto's action modules (``plugin_utils/action_module.py``): the module file keeps
``ARGUMENT_SPEC``, ``MODULE_OPTIONS`` and ``run_module(module)``; ``main()`` builds an ``AnsibleModule`` and calls
``run_module``, this file builds an :class:`InProcessModule` and calls the same function.
"""

from __future__ import annotations

import grp
import importlib
import os
import pwd
import stat
import sys
import traceback
import typing as t

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.errors import UnsupportedError
from ansible.module_utils.common.parameters import remove_values
from ansible.module_utils.common.process import get_bin_path
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.vars import merge_hash

MODULES_PACKAGE = "ansible_collections.hpc.interactive.plugins.modules."
IN_PROCESS_VAR = "hpc_interactive_in_process"

display = Display()


class _ModuleExit(BaseException):
    """Raised by exit_json/fail_json: like the SystemExit of a real module, no ``except Exception`` stops it."""

    def __init__(self, result: dict[str, t.Any]) -> None:
        super().__init__()
        self.result = result


class InProcessModule:
    """The part of ``AnsibleModule``'s interface this collection's modules use, for a run inside the worker."""

    def __init__(self, name: str, argument_spec: dict[str, t.Any], params: dict[str, t.Any], *, check_mode: bool,
                 diff: bool, supports_check_mode: bool = False, **validator_options: t.Any) -> None:
        self._name = name
        self.check_mode = check_mode
        self._diff = diff
        self._warnings: list[str] = []
        # the base validator: ModuleArgumentSpecValidator would send its warnings to the display here, in the
        # controller, instead of into the result as AnsibleModule does; they are added below like it adds them
        validated = ArgumentSpecValidator(argument_spec, **validator_options).validate(params)
        for w in validated._warnings:
            self.warn("Both option %s and its alias %s are set." % (w["option"], w["alias"]))
        self.no_log_values = set(validated._no_log_values)
        self.params: dict[str, t.Any] = dict(params)
        self.params.update(validated.validated_parameters)
        if validated.error_messages:
            msg = validated.errors.msg
            if isinstance(validated.errors[0], UnsupportedError):
                msg = "Unsupported parameters for (%s) module: %s" % (name, msg)
            self.fail_json(msg=msg)
        if check_mode and not supports_check_mode:
            self.exit_json(skipped=True, msg="remote module (%s) does not support check mode" % name)

    def warn(self, warning: str) -> None:
        self._warnings.append(warning)

    def get_bin_path(self, arg: str, required: bool = False, opt_dirs: list[str] | None = None) -> str | None:
        try:
            return get_bin_path(arg, opt_dirs=opt_dirs or [])
        except ValueError as exc:
            if required:
                self.fail_json(msg=str(exc))
            return None

    @staticmethod
    def _add_path_info(result: dict[str, t.Any]) -> None:
        """What AnsibleModule.add_path_info adds for a result naming a ``path`` (or ``dest``) that exists."""
        path = result.get("path", result.get("dest"))
        if not isinstance(path, str) or not os.path.exists(path):
            return
        st = os.lstat(path)
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        if stat.S_ISLNK(st.st_mode):
            state = "link"
        elif stat.S_ISDIR(st.st_mode):
            state = "directory"
        else:
            state = "hard" if st.st_nlink > 1 else "file"
        result.update(uid=st.st_uid, gid=st.st_gid, owner=owner, group=group, mode="0%03o" % stat.S_IMODE(st.st_mode),
                      state=state, size=st.st_size)

    def _finish(self, result: dict[str, t.Any]) -> t.NoReturn:
        self._add_path_info(result)
        result.setdefault("invocation", {"module_args": dict(self.params)})
        if self._warnings:
            result["warnings"] = list(self._warnings)
        raise _ModuleExit(remove_values(result, self.no_log_values))

    def exit_json(self, **kwargs: t.Any) -> t.NoReturn:
        kwargs.setdefault("changed", False)
        self._finish(kwargs)

    def fail_json(self, msg: str, **kwargs: t.Any) -> t.NoReturn:
        kwargs["failed"] = True
        kwargs["msg"] = msg
        self._finish(kwargs)


class InProcessAction(ActionBase):
    """Action plugin base: run the module named by ``MODULE`` in the worker when that is the same as shipping it."""

    MODULE = ""
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = True

    @classmethod
    def preload(cls) -> None:
        """Import the module this action runs in the worker (the strategy linear_idle calls it before forking)."""
        if cls.MODULE:
            importlib.import_module(MODULES_PACKAGE + cls.MODULE)

    def _in_process(self, task_vars: dict[str, t.Any]) -> bool:
        if not task_vars.get(IN_PROCESS_VAR, True):
            return False
        return (self._connection.transport == "local" and not self._play_context.become
                and not self._task.async_val and not self._compute_environment_string())

    def run(self, tmp: t.Any = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp
        if not self._in_process(task_vars):
            # what ansible.builtin.normal does for any module
            wrap_async = bool(self._task.async_val) and not self._connection.has_native_async
            result = merge_hash(result, self._execute_module(task_vars=task_vars, wrap_async=wrap_async))
            if not wrap_async:
                self._remove_tmp_path(self._connection._shell.tmpdir)
            return result
        display.vvv("%s: run in the Ansible worker (local connection, same user)" % self._task.action,
                    host=self._play_context.remote_addr)
        name = MODULES_PACKAGE + self.MODULE
        loaded = "was preloaded" if name in sys.modules else "is imported in the worker"
        display.debug("%s: its module %s" % (self._task.action, loaded))
        mod = importlib.import_module(name)
        args = {k: v for k, v in self._task.args.items() if not k.startswith("_ansible_")}
        try:
            module = InProcessModule(self._task.action, mod.ARGUMENT_SPEC, args, check_mode=bool(self._task.check_mode),
                                     diff=bool(self._task.diff), **mod.MODULE_OPTIONS)
            mod.run_module(module)
            # a module always ends with exit_json or fail_json; falling off the end is a bug in it
            result.update(failed=True, msg="module %s returned without a result" % self.MODULE)
        except _ModuleExit as done:
            result.update(done.result)
        except Exception as exc:  # noqa: BLE001 - a crash is reported like a crashed module, not as an Ansible bug
            result.update(failed=True, msg="module %s failed: %s: %s" % (self.MODULE, type(exc).__name__, exc),
                          exception=traceback.format_exc())
        return result

"""The gateway's pages: plain HTML and one style sheet, no build step, every value escaped.

Everything that comes from a session (status, message, names, problems) goes through :func:`e`; the only script
is ``static/session.js``, which writes what it fetches with ``textContent``. The pages work without it (the
loading page then refreshes itself).
"""
from __future__ import annotations

import html
import time
from typing import Any, Dict, Iterable, List, Optional

from .. import sessions

e = html.escape

TARGETS = ("workspace", "controller", "compute")
# session inputs the form sets itself or that make no sense to a person in a browser
HIDDEN_INPUTS = ("session_id", "session_root", "session_service", "session_target", "session_resource",
                 "session_python")


def layout(title: str, body: str, *, csrf: Optional[str] = None, user: Optional[str] = None,
           refresh: Optional[int] = None) -> str:
    nav = ""
    if user is not None:
        logout = (f'<form method="post" action="/logout" class="inline"><input type="hidden" name="_csrf" '
                  f'value="{e(csrf or "")}"><button type="submit">Log out</button></form>')
        nav = (f'<nav aria-label="Main"><a href="/">Sessions</a> <span class="who">{e(user)}</span> {logout}</nav>')
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)} - isession</title>{meta}<link rel=\"stylesheet\" href=\"/static/style.css\"></head>"
            f"<body><a class=\"skip\" href=\"#main\">Skip to content</a><header><p class=\"brand\">isession</p>"
            f"{nav}</header><main id=\"main\"><h1>{e(title)}</h1>{body}</main></body></html>\n")


def login_page(next_url: str, *, multi: bool, error: str = "") -> str:
    err = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    user = ('<p><label for="user">User name</label><input id="user" name="user" autocomplete="username" required>'
            "</p>") if multi else ""
    hint = ("" if multi else "<p id=\"secret-help\" class=\"help\">The secret is in the file "
            "<code>~/.config/isession/gateway.secret</code> (or the one the gateway was started with).</p>")
    body = (f"{err}<form method=\"post\" action=\"/login\">{user}"
            "<p><label for=\"secret\">Login secret</label>"
            "<input id=\"secret\" name=\"secret\" type=\"password\" autocomplete=\"current-password\" required "
            "aria-describedby=\"secret-help\"></p>"
            f"{hint}<input type=\"hidden\" name=\"next\" value=\"{e(next_url)}\">"
            "<p><button type=\"submit\">Log in</button></p></form>")
    return layout("Log in", body)


def app_path(sess: sessions.Session) -> str:
    """``<URL>/<PORT>/<SLUG>`` on this gateway ("" until known); only /me and /sme with a numeric port."""
    url, port = sess.service.get("URL"), str(sess.service.get("PORT") or "")
    if url not in ("/me", "/sme") or not port.isdigit():
        return ""
    return f"{url}/{port}/{sess.service.get('SLUG') or ''}"


def fmt_time(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def where(sess: sessions.Session) -> str:
    target = str(sess.record.get("target") or "-")
    res = sess.record.get("resource")
    return f"{target} of {res}" if res and target != "workspace" else target


def cancel_form(sid: str, csrf: str, label: str = "Cancel") -> str:
    return (f'<form method="post" action="/session/{e(sid)}/cancel" class="inline">'
            f'<input type="hidden" name="_csrf" value="{e(csrf)}">'
            f'<button type="submit" class="danger" aria-label="{e(label)} session {e(sid)}">{e(label)}</button></form>')


def list_page(rows: List[Dict[str, Any]], services: Iterable[str], csrf: str, user: str) -> str:
    starts = "".join(f'<li><a class="button" href="/start/{e(s)}">Start {e(s)}</a></li>' for s in services)
    if rows:
        trs = []
        for r in rows:
            sess: sessions.Session = r["sess"]
            status = e(sess.status)
            if sess.problem:
                status += f'<br><span class="problem">{e(sess.problem)}</span>'
            actions = []
            path = app_path(sess)
            if sess.status == "Running" and path:
                actions.append(f'<a href="{e(path)}">Open</a>')
            actions.append(f'<a href="/session/{e(sess.id)}">Details</a>')
            if r["live"]:
                actions.append(cancel_form(sess.id, csrf))
            warn = ' class="warn"' if r.get("warn") else ""
            trs.append(f"<tr><th scope=\"row\"><a href=\"/session/{e(sess.id)}\">{e(sess.id)}</a></th>"
                       f"<td>{e(str(sess.record.get('service') or '-'))}</td><td>{e(where(sess))}</td>"
                       f"<td class=\"status status-{e(sess.status.lower())}\">{status}</td>"
                       f"<td>{e(fmt_time(sess.record.get('created')))}</td><td{warn}>{e(r['time_left'])}</td>"
                       f"<td>{e(r['idle_left'])}</td><td class=\"actions\">{' '.join(actions)}</td></tr>")
        table = ("<table><caption>Your sessions, newest first</caption><thead><tr><th scope=\"col\">Session</th>"
                 "<th scope=\"col\">Service</th><th scope=\"col\">Resource</th><th scope=\"col\">Status</th>"
                 "<th scope=\"col\">Started</th><th scope=\"col\">Time left</th>"
                 "<th scope=\"col\">Idle cancel in</th><th scope=\"col\">Actions</th></tr></thead>"
                 f"<tbody>{''.join(trs)}</tbody></table>")
    else:
        table = "<p>No sessions yet.</p>"
    body = f"<h2>Start a session</h2><ul class=\"starts\">{starts}</ul><h2>Sessions</h2>{table}"
    return layout("Sessions", body, csrf=csrf, user=user, refresh=15)


def _field(row: Dict[str, Any], prefix: str = "in_") -> str:
    name, kind = row["name"], row["type"]
    fid = f"{prefix}{name}"
    help_id = f"{fid}-help"
    default = row.get("default")
    desc = row.get("description") or ""
    req = " required" if row.get("required") else ""
    described = f' aria-describedby="{e(help_id)}"' if desc else ""
    label = f'<label for="{e(fid)}">{e(name)}</label>'
    if row.get("choices"):
        opts = "".join(f'<option value="{e(str(c))}"{" selected" if c == default else ""}>{e(str(c))}</option>'
                       for c in row["choices"])
        control = f'<select id="{e(fid)}" name="{e(fid)}"{described}{req}>{opts}</select>'
    elif kind == "bool":
        checked = " checked" if default else ""
        control = (f'<input type="hidden" name="{e(fid)}" value="false">'
                   f'<input type="checkbox" id="{e(fid)}" name="{e(fid)}" value="true"{checked}{described}>')
    elif kind == "list":
        text = "\n".join(str(x) for x in default or [])
        control = f'<textarea id="{e(fid)}" name="{e(fid)}" rows="2"{described}>{e(text)}</textarea>'
        desc = (desc + " One item per line.").strip()
    elif kind == "int":
        value = "" if default is None else str(default)
        control = f'<input type="number" id="{e(fid)}" name="{e(fid)}" value="{e(value)}"{described}{req}>'
    else:
        value = "" if default is None else str(default)
        control = f'<input type="text" id="{e(fid)}" name="{e(fid)}" value="{e(value)}"{described}{req}>'
    help_text = f'<span class="help" id="{e(help_id)}">{e(desc)}</span>' if desc else ""
    return f'<div class="field">{label}{control}{help_text}</div>'


def start_page(info: Dict[str, Any], resources: List[str], csrf: str, user: str, *, idle_default_min: float,
               error: str = "") -> str:
    service = info["service"]
    err = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    targets = "".join(f'<option value="{t}"{" selected" if t == ("compute" if resources else "workspace") else ""}>'
                      f"{t}</option>" for t in TARGETS)
    res_opts = "".join(f'<option value="{e(r)}">{e(r)}</option>' for r in resources)
    where_fs = ("<fieldset><legend>Where</legend>"
                f'<div class="field"><label for="target">Target</label><select id="target" name="target">{targets}'
                '</select><span class="help">workspace: this machine; controller: the cluster\'s login node; '
                "compute: a compute node through the scheduler.</span></div>"
                '<div class="field"><label for="resource">Resource</label>'
                f'<select id="resource" name="resource"><option value="">(none: workspace)</option>{res_opts}'
                "</select><span class=\"help\">The cluster (its controller in the inventory).</span></div>"
                "</fieldset>")
    svc_fields = "".join(_field(r) for r in info["service_inputs"]) or "<p>This service has no inputs.</p>"
    sess_fields = "".join(_field(r) for r in info["session_inputs"] if r["name"] not in HIDDEN_INPUTS)
    idle = ('<fieldset><legend>Gateway</legend><div class="field"><label for="idle_timeout">Idle timeout (minutes)'
            f'</label><input type="number" min="0" step="any" id="idle_timeout" name="idle_timeout" '
            f'value="{e(f"{idle_default_min:g}")}" aria-describedby="idle-help"><span class="help" id="idle-help">'
            "Cancel the session after this long without any traffic through the gateway; 0 never does."
            "</span></div></fieldset>")
    body = (f"<p>{e(info.get('description') or '')}</p>{err}"
            f'<form method="post" action="/start/{e(service)}" class="start">'
            f'<input type="hidden" name="_csrf" value="{e(csrf)}">{where_fs}'
            f"<fieldset><legend>{e(service)} inputs</legend>{svc_fields}</fieldset>"
            f"<details><summary>Session inputs (scheduler, environment, timeouts)</summary><fieldset>"
            f"<legend>Session inputs</legend>{sess_fields}</fieldset></details>{idle}"
            f'<p><button type="submit">Start {e(service)}</button></p></form>')
    return layout(f"Start {service}", body, csrf=csrf, user=user)


def session_page(sess: Optional[sessions.Session], sid: str, csrf: str, user: str, *, live: bool,
                 time_left: str, idle_left: str, warn: str, start_log: str = "", pending: bool = False) -> str:
    status = sess.status if sess else ("Submitting" if pending else "Unknown")
    message = sess.message if sess else ""
    problem = sess.problem if sess else ""
    path = app_path(sess) if sess else ""
    terminal = status in ("Cancelled", "Completed", "Failed") or (sess is None and not pending)
    title = f"Session {sid}"
    parts = [f'<div class="card" data-session="{e(sid)}" data-app="{e(path) if status == "Running" else ""}">']
    parts.append(f'<p>Status: <strong id="status" class="status status-{e(status.lower())}" '
                 f'aria-live="polite">{e(status)}</strong></p>')
    if status == "Failed" or (sess is None and not pending):
        parts.append(f'<div class="error" role="alert"><h2>The session failed</h2><pre id="message">{e(message)}'
                     "</pre></div>")
    else:
        parts.append(f'<p id="message" class="message" aria-live="polite">{e(message)}</p>')
    if problem:
        parts.append(f'<p class="problem">Problem reading the session: {e(problem)}</p>')
    if warn:
        parts.append(f'<p class="warn" role="alert" id="warn">{e(warn)}</p>')
    else:
        parts.append('<p class="warn" role="alert" id="warn" hidden></p>')
    if sess is not None:
        parts.append("<dl>"
                     f"<dt>Service</dt><dd>{e(str(sess.record.get('service') or '-'))}</dd>"
                     f"<dt>Resource</dt><dd>{e(where(sess))}</dd>"
                     f"<dt>Started</dt><dd>{e(fmt_time(sess.record.get('created')))}</dd>"
                     f"<dt>Time left</dt><dd id=\"time-left\">{e(time_left)}</dd>"
                     f"<dt>Idle cancel in</dt><dd id=\"idle-left\">{e(idle_left)}</dd></dl>")
    if start_log:
        parts.append(f"<details><summary>Start output</summary><pre>{e(start_log)}</pre></details>")
    if not terminal:
        parts.append('<p id="waiting">Waiting for the app to start; this page opens it when it is ready. '
                     '<button type="button" id="notify" hidden>Notify me when it is ready</button></p>')
    link = f'<a class="button" id="open" href="{e(path)}">Open</a>' if status == "Running" and path else ""
    parts.append(f'<p class="actions">{link} {cancel_form(sid, csrf) if live else ""} <a href="/">All sessions</a>'
                 "</p></div>")
    parts.append('<script src="/static/session.js" defer></script>')
    return layout(title, "".join(parts), csrf=csrf, user=user, refresh=None)


def error_page(status: int, text: str) -> str:
    return layout(f"Error {status}", f'<p class="error" role="alert">{e(text)}</p><p><a href="/">Sessions</a></p>')

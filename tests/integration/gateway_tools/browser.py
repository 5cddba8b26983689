"""Drive Debian's chromium through the gateway like a person (run inside the bed's workspace host as its user).

    browser.py CONFIG.json      -> one JSON line: what it saw; screenshots in CONFIG["shots"]

Steps: log in; the pages of sessions whose status or ERROR_MESSAGE hold markup (must show as text, run nothing);
start a JupyterLab session on the cluster's compute nodes from the start form; wait on the loading page until it
opens the app (and notifies); JupyterLab's launcher; a notebook cell run over the kernel WebSocket; Cancel from the
session list. Step "vnc": a VNC desktop started from the form, the XFCE desktop through noVNC.
"""
import contextlib
import json
import re
import sys
import time

from playwright.sync_api import sync_playwright

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# records notifications across the navigation that follows them (sessionStorage is per tab and origin)
NOTIFY_SPY = """
(() => {
  class Spy { constructor(title, opts) { const n = JSON.parse(sessionStorage.getItem('notes') || '[]');
      n.push(title); sessionStorage.setItem('notes', JSON.stringify(n)); } }
  Spy.permission = 'granted';
  Spy.requestPermission = () => Promise.resolve('granted');
  window.Notification = Spy;
})();
"""


def main(cfg):
    out = {"steps": []}
    shots = cfg["shots"]

    def shot(page, name):
        page.screenshot(path=f"{shots}/{name}.png", full_page=False)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS, headless=True)
        ctx = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=cfg["base"])
        ctx.add_init_script(NOTIFY_SPY)
        page = ctx.new_page()
        try:
            steps(cfg, page, out, shot)
        except Exception:
            shot(page, "99-failure")
            print(json.dumps(out), file=sys.stderr)
            raise
        browser.close()
    return out


def steps(cfg, page, out, shot):
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def dialog(d):
        if d.type == "beforeunload":  # JupyterLab asks before leaving an unsaved notebook
            d.accept()
        else:
            errors.append("dialog: " + d.message)
            d.dismiss()

    page.on("dialog", dialog)

    page.goto("/")
    assert "/login" in page.url, page.url
    page.fill("#secret", cfg["secret"])
    shot(page, "01-login")
    page.click("button[type=submit]")
    page.wait_for_url(cfg["base"] + "/")
    out["steps"].append("login")
    shot(page, "02-sessions")

    for sid in cfg.get("xss", []):
        page.goto(f"/session/{sid}")
        out.setdefault("xss", {})[sid] = {
            "text": page.inner_text("main"),
            "flag": page.evaluate("window.__xss === undefined ? null : window.__xss"),
            "injected": page.evaluate("document.querySelectorAll('main script:not([src]), main img, main b').length"),
        }
        shot(page, f"03-xss-{sid}")
    if cfg.get("xss"):
        page.goto("/")
        out["xss_list"] = {"text": page.inner_text("main"),
                           "flag": page.evaluate("window.__xss === undefined ? null : window.__xss"),
                           "injected": page.evaluate("document.querySelectorAll('main img, main b').length")}
        shot(page, "03-xss-list")

    if cfg.get("jupyterlab"):
        page.goto("/start/jupyterlab")
        page.select_option("#target", "compute")
        page.select_option("#resource", cfg["resource"])
        page.fill("#idle_timeout", "0")
        shot(page, "04-start-form")
        page.click("form.start button[type=submit]")
        page.wait_for_url(re.compile(r".*/session/[A-Za-z0-9._-]+$"))
        sid = page.url.rsplit("/", 1)[1]
        out["sid"] = sid
        out["loading_status"] = page.inner_text("#status")
        shot(page, "05-loading")
        page.wait_for_url(re.compile(r".*/me/[0-9]+/lab.*"), timeout=240_000)
        out["app_url"] = page.url
        out["notes"] = json.loads(page.evaluate("sessionStorage.getItem('notes') || '[]'"))
        # the cluster user's home keeps JupyterLab's last layout; ?reset starts from the launcher
        page.goto(page.url.split("?")[0] + "?reset")
        page.wait_for_selector(".jp-Launcher", timeout=120_000)
        time.sleep(1)
        shot(page, "06-jupyterlab-launcher")
        out["steps"].append("launcher")
        page.click('.jp-LauncherCard[data-category="Notebook"]')
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content", timeout=60_000)
        # the kernel is connected (over its WebSocket, through the gateway) when the status bar says Idle
        page.wait_for_function("document.body.innerText.includes('(ipykernel) | Idle')", timeout=90_000)
        page.click(".jp-NotebookPanel .jp-Cell .cm-content")
        # insert_text, not type: typed brackets and quotes would be doubled by the editor's auto-close
        page.keyboard.insert_text("print(6 * 7, 'through the gateway')")
        shot(page, "07a-cell-typed")
        page.keyboard.press("Shift+Enter")
        page.wait_for_selector(".jp-OutputArea-output:has-text('42 through the gateway')", timeout=90_000)
        shot(page, "07-notebook-cell")
        out["steps"].append("cell")
        page.goto("/")
        shot(page, "08-sessions-running")
        page.get_by_role("button", name=f"Cancel session {sid}").click()
        page.wait_for_url(re.compile(rf".*/session/{re.escape(sid)}$"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the page reloads itself when the session ends
            with contextlib.suppress(Exception):  # a reload in progress
                if page.inner_text("#status", timeout=2000) == "Cancelled":
                    break
            time.sleep(0.5)
        out["final_status"] = page.inner_text("#status")
        shot(page, "09-cancelled")
        out["steps"].append("cancelled")
    if cfg.get("vnc"):
        page.goto("/start/vnc")
        page.select_option("#target", "compute")
        page.select_option("#resource", cfg["resource"])
        page.click("form.start button[type=submit]")
        page.wait_for_url(re.compile(r".*/session/[A-Za-z0-9._-]+$"))
        vsid = page.url.rsplit("/", 1)[1]
        page.wait_for_url(re.compile(r".*/me/[0-9]+/.*"), timeout=240_000)
        page.wait_for_selector("canvas", timeout=60_000)
        time.sleep(5)
        # distinct colours in a grid of samples of noVNC's canvas: a desktop has many, a blank screen one
        out["vnc_colours"] = page.evaluate("""() => { const c = document.querySelector('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const seen = new Set();
            for (let i = 0; i < d.length; i += 4 * 997) { seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]); }
            return seen.size; }""")
        shot(page, "10-vnc-desktop")
        page.goto("/")
        page.get_by_role("button", name=f"Cancel session {vsid}").click()
        out["steps"].append("vnc")
    out["errors"] = errors


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(json.dumps(main(json.load(fh))))

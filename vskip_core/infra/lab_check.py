"""What a reader sees in JupyterLab, checked in a real (headless) browser: `make lab-check`.

Starts JupyterLab on loopback (its own settings: every cell rendered, no autosave, no kernel started), opens
each `results/<run>/*/executed.ipynb` in headless Chromium and fails on what would undermine a reader's trust:

- a progress bar frozen at "0%" (a saved widget shows its first state),
- a price rendered as LaTeX (MathJax output inside a cell's output),
- an error or warning output (stderr or a traceback),
- a table, figure or text output wider than the notebook column.

Saves a full-page screenshot of each notebook and `report.json` (findings and page heights) under
`results/<run>/lab/`. Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`) and
selenium (the `lab` extra).

    python -m vskip_core.infra.lab_check --run smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {  # JupyterLab user settings for the check (a private settings folder; the user's are untouched)
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",  # render every cell, so every output is checked and in the screenshot
        "autoStartDefaultKernel": False,
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "checkForUpdates": False,
        "fetchNews": "false",
    },
}
WIDTH, MAX_HEIGHT = 1400, 30000  # browser window (px); screenshots taller than MAX_HEIGHT are cut

# Runs in the page: findings for the open notebook, and its height.
PROBE_JS = r"""
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
if (!panel) { return {error: 'no notebook panel'}; }
const cells = panel.querySelectorAll('.jp-Cell');
const top = panel.getBoundingClientRect().top - panel.scrollTop;
let bottom = 0;
cells.forEach(c => { bottom = Math.max(bottom, c.getBoundingClientRect().bottom - top); });
const out = {zero_bars: [], math: [], errors: [], wide: [], height: Math.round(bottom)};
cells.forEach((cell, i) => {
  cell.querySelectorAll('.jp-OutputArea-output').forEach(o => {
    const text = o.innerText || '';
    if (/(^|\s|:)0%\|/.test(text)) { out.zero_bars.push({cell: i, text: text.slice(0, 120)}); }
    if (o.querySelector('mjx-container, .MathJax')) {
      out.math.push({cell: i, text: text.slice(0, 120)});
    }
    const mime = o.getAttribute('data-mime-type') || '';
    if (mime.includes('stderr') || mime.includes('error') || o.querySelector('.jp-RenderedText[data-mime-type*="stderr"]')) {
      out.errors.push({cell: i, text: text.slice(0, 160)});
    }
    const area = o.getBoundingClientRect().width;
    o.querySelectorAll('table, img, pre').forEach(el => {
      const w = Math.max(el.scrollWidth, el.getBoundingClientRect().width);
      const box = el.closest('.jp-RenderedHTMLCommon, .jp-RenderedImage, .jp-RenderedText') || o;
      if (w > area + 2 || box.scrollWidth > box.clientWidth + 2) {
        out.wide.push({cell: i, tag: el.tagName, width: Math.round(w), column: Math.round(area)});
      }
    });
  });
});
return out;
"""


class LabCheckError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser(chromium: str, driver: str):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise LabCheckError(
            "lab-check needs selenium: .venv/bin/pip install selenium (the lab extra)"
        ) from None
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={WIDTH},1000", "--hide-scrollbars"):  # fmt: skip
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _start_lab(port: int, token: str, settings_dir: Path) -> subprocess.Popen:
    for name, value in SETTINGS.items():
        f = settings_dir / "settings" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings_dir / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(settings_dir / "workspaces")}  # fmt: skip
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={ROOT}", f"--IdentityProvider.token={token}"]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise LabCheckError(
                    f"JupyterLab exited at start (code {proc.returncode}): {' '.join(cmd)}"
                ) from None
            time.sleep(0.5)
    proc.terminate()
    raise LabCheckError("JupyterLab did not answer within 60 s")


def check_notebook(browser, base: str, rel: str, shot: Path) -> dict:
    """Open one notebook, wait for it to render, return the findings and save a full-page screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(WIDTH, 1000)
    browser.get(f"{base}/lab/tree/{rel}?reset")  # a fresh workspace: only this notebook open
    WebDriverWait(browser, 90).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell"))
    )
    time.sleep(4)  # outputs, images and MathJax finish rendering
    found = browser.execute_script(PROBE_JS)
    height = int(found.get("height") or 1000)
    browser.set_window_size(WIDTH, min(MAX_HEIGHT, height + 160))  # the notebook fills the window: all of it
    time.sleep(1.5)
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="smoke", help="results/<run>/ whose executed notebooks are checked")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--driver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    args = ap.parse_args(argv)
    run_dir = ROOT / "results" / args.run
    notebooks = sorted(run_dir.glob("*/executed.ipynb"))
    if not notebooks:
        print(f"error: no executed notebooks under {run_dir}; run `make reproduce RUN={args.run}` first "
              f"(for a smoke run: make reproduce PARAMS=params/smoke.yaml RUN={args.run})", file=sys.stderr)  # fmt: skip
        return 2
    for exe in (args.chromium, args.driver):
        if not Path(exe).exists():
            print(f"error: {exe} not found: lab-check needs Chromium and its driver "
                  "(Debian: apt-get install chromium chromium-driver)", file=sys.stderr)  # fmt: skip
            return 2
    port, token = _free_port(), "labcheck"
    report: dict = {"run": args.run, "notebooks": {}}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            lab = _start_lab(port, token, Path(tmp))
        except LabCheckError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        browser = None
        try:
            browser = _browser(args.chromium, args.driver)
            base = f"http://127.0.0.1:{port}"
            browser.get(f"{base}/lab?token={token}")  # sets the session cookie
            for nb in notebooks:
                rel = nb.relative_to(ROOT).as_posix()
                found = check_notebook(browser, base, rel, run_dir / "lab" / f"{nb.parent.name}.png")
                bad = {k: v for k, v in found.items() if k in ("zero_bars", "math", "errors", "wide") and v}
                if "error" in found:
                    bad["page"] = found["error"]
                failed += bool(bad)
                report["notebooks"][nb.parent.name] = {"height_px": found.get("height"), "findings": bad}
                verdict = "ok" if not bad else "FAIL " + ", ".join(f"{k}: {len(v)}" for k, v in bad.items())
                print(f"{nb.parent.name}: {found.get('height')} px, {verdict}", flush=True)
                for k, v in bad.items():
                    for item in (v if isinstance(v, list) else [v])[:3]:
                        print(f"    {k}: {item}")
        except LabCheckError as e:  # selenium missing: say so, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            if browser is not None:
                browser.quit()
            lab.terminate()
            lab.wait(timeout=20)
    (run_dir / "lab").mkdir(parents=True, exist_ok=True)
    (run_dir / "lab" / "report.json").write_text(json.dumps(report, indent=1))
    print(
        f"screenshots and report.json: {run_dir / 'lab'}; {failed} of {len(notebooks)} notebooks with findings"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Chromium's own ``EventSource`` against one scenario stream; prints one JSON line.

``python browser_client.py URL TIMEOUT TYPES`` opens ``/blank`` of the scenario
server (same origin) in Debian's Chromium (``/usr/bin/chromium``, headless,
driven by Playwright; no browser is downloaded), runs an ``EventSource`` on URL
in the page and prints what it dispatched, in the format of ``py_client.py``.
The second line is Chromium's version.
"""

from __future__ import annotations

import json
import sys
from urllib.parse import urlsplit

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

READ = """
([url, timeoutMs, types]) => new Promise((resolve) => {
  const events = [];
  let done = false;
  const es = new EventSource(url);
  const finish = (end, error) => {
    if (done) return;
    done = true;
    es.close();
    resolve(error === undefined ? {events, end} : {events, end, error});
  };
  for (const type of types) {
    es.addEventListener(type, (e) => {
      events.push({type: e.type, data: e.data, id: e.lastEventId});
      if (e.type === "end") finish("end-event");
    });
  }
  // readyState 2 (CLOSED): the browser gave up; 0 (CONNECTING): it reconnects.
  es.onerror = () => setTimeout(() => es.readyState === 2 && finish("closed"), 0);
  setTimeout(() => finish("timeout"), timeoutMs);
})
"""


def main() -> None:
    url, timeout, types = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(",")
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(origin + "/blank")
            result = page.evaluate(READ, [url, int(timeout * 1000), types])
            print(json.dumps(result))
            print(json.dumps({"version": browser.version}))
        finally:
            browser.close()


if __name__ == "__main__":
    main()

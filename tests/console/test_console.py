#!/usr/bin/env python3
"""The console in a real browser (docs/console.md).

Starts `APP dev` (tests/console/console_app.c: loom's services plus a demo
service whose commands emit events and publish a follow-up) on its embedded
defaults in a fresh directory, and drives Debian's headless chromium with
Selenium through every page: sign in, see a node, find a rejected and a stuck
command, park and replay the stuck one and watch it apply, open the story of a
command that caused a follow-up, and check that data holding markup shows as
text. With LOOM_CONSOLE_SCREENSHOTS=1 it writes each page's screenshot to
docs/console-*.png (CI leaves the tree alone).

usage: test_console.py APP
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHOTS = os.environ.get("LOOM_CONSOLE_SCREENSHOTS") == "1"
WAIT = 60  # seconds: generous, the machine is shared
READER = "reader-token-for-the-console-test"


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def start_dev(app, workdir):
    env = dict(os.environ)
    # A second token that may read but not steer.
    tokens = os.path.join(workdir, "tokens")
    with open(tokens, "w") as f:
        f.write("%s reader nodes:read,commands:read\n" % hashlib.sha256(READER.encode()).hexdigest())
    env.update({
        "LOOM_API_TOKENS_FILE": tokens,
        "LOOM_DEV_DIR": os.path.join(workdir, ".loom"),
        "LOOM_API_LISTEN": "127.0.0.1:0",
        "LOOM_LOG_LEVEL": "warn",
    })
    out = open(os.path.join(workdir, "dev.out"), "w+")
    err = open(os.path.join(workdir, "dev.err"), "w+")
    proc = subprocess.Popen([app, "dev"], cwd=workdir, env=env, stdout=out, stderr=err)
    deadline = time.time() + 180
    while time.time() < deadline:
        out.seek(0)
        text = out.read()
        if "Press Ctrl-C" in text:
            console = re.search(r"console\s+(\S+/console)", text)
            token = re.search(r"token\s+(loomdev_[0-9a-f]+)", text)
            if not console or not token:
                fail("the banner lacks the console or the token:\n" + text)
            return proc, console.group(1), token.group(1), text
        if proc.poll() is not None:
            err.seek(0)
            fail("loom dev exited with %s:\n%s\n%s" % (proc.returncode, text, err.read()))
        time.sleep(0.2)
    fail("loom dev did not come up in 180 s")


def stop_dev(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            fail("loom dev did not stop on SIGINT within 90 s")
    if proc.returncode != 0:
        fail("loom dev exited with status %s" % proc.returncode)


class Api:
    def __init__(self, base, token):
        self.base, self.token = base, token

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def wait_status(self, cid, want):
        deadline = time.time() + WAIT
        while time.time() < deadline:
            st, body = self.call("GET", "/v1/commands/" + cid)
            if st == 200 and body["status"] == want:
                return body
            time.sleep(0.3)
        fail("command %s did not become %s: %s" % (cid, want, body))


def browser(workdir):
    opts = Options()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--user-data-dir=" + os.path.join(workdir, "chromium-profile")):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)


def wait_for(driver, what, cond):
    """cond(driver) until it is truthy; the page re-renders itself every few
    seconds, so an element found a moment ago may be gone: look again."""
    deadline = time.time() + WAIT
    while time.time() < deadline:
        try:
            v = cond(driver)
            if v:
                return v
        except (StaleElementReferenceException, NoSuchElementException):
            pass
        time.sleep(0.2)
    page = driver.find_element(By.TAG_NAME, "body").text
    fail("waiting for %s; the page shows:\n%s" % (what, page[:3000]))


def act(driver, what, by, sel, fn):
    """fn(element) on the element found now, again if the page re-rendered
    it in between (a stuck command's page changes with every retry)."""
    def once(d):
        e = d.find_element(by, sel)
        if not e.is_enabled():
            return False
        fn(e)
        return True
    wait_for(driver, what, once)


def click(driver, what, by, sel):
    act(driver, what, by, sel, lambda e: e.click())


def shot(driver, name):
    if SHOTS:
        time.sleep(0.5)
        driver.save_screenshot(os.path.join(ROOT, "docs", "console-%s.png" % name))


def no_xss(driver):
    state = driver.execute_script(
        "return {xss: window.__xss === undefined ? null : window.__xss,"
        " imgs: document.querySelectorAll('#page img').length,"
        " scripts: document.scripts.length}")
    if state["xss"] is not None or state["imgs"] or state["scripts"] != 1:
        fail("markup from data ran or became elements: %s" % state)


def goto(driver, base, hash_):
    driver.execute_script("location.hash = arguments[0]", hash_)


def main():
    if len(sys.argv) != 2:
        fail(__doc__)
    app = os.path.abspath(sys.argv[1])
    workdir = tempfile.mkdtemp(prefix="loom-console-")
    os.chmod(workdir, 0o755)  # as root, the private Postgres runs as another user
    proc, console, token, banner = start_dev(app, workdir)
    base = console[: -len("/console")]
    api = Api(base, token)
    driver = None
    try:
        # The console's own answers: the strict policy, no token needed.
        with urllib.request.urlopen(console, timeout=30) as r:
            csp = r.headers["Content-Security-Policy"] or ""
            page = r.read().decode()
        if "script-src 'self'" not in csp or "unsafe" in csp or "default-src 'none'" not in csp:
            fail("weak Content-Security-Policy: %r" % csp)
        if re.search(r"<script(?![^>]*\bsrc=)", page) or "style=" in page or "http" in page:
            fail("the page has inline script or style, or a remote address")
        for method, path, want in (("GET", "/console/nothing.js", 404), ("POST", "/console", 405),
                                   ("GET", "/console/console.js", 200), ("HEAD", "/console/", 200)):
            req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    st, hdr = r.status, r.headers
            except urllib.error.HTTPError as e:
                st, hdr = e.code, e.headers
            if st != want or "default-src 'none'" not in (hdr["Content-Security-Policy"] or ""):
                fail("%s %s: %s, CSP %r" % (method, path, st, hdr["Content-Security-Policy"]))

        # Commands: applied with a follow-up, rejected, stuck.
        st, ok = api.call("POST", "/v1/demo/orders?wait=10s", {"order": "ok-1"})
        if st != 200 or ok["status"] != "applied":
            fail("order ok-1: %s %s" % (st, ok))
        ok_ray = api.wait_status(ok["command_id"], "applied")["consumers"][0]["ray_id"]
        # The follow-up of ok-1 is applied by the same consumer, through the outbox
        # (before anything is stuck: a stuck command holds back its partition).
        deadline = time.time() + WAIT
        while True:
            st, story = api.call("GET", "/v1/commands/%s/story" % ok["command_id"])
            ships = [c for c in story.get("commands", []) if c["type"] == "demo.ship"]
            if ships and ships[0]["consumers"][0]["status"] == "applied":
                break
            if time.time() > deadline:
                fail("the follow-up demo.ship was not applied: %s" % story)
            time.sleep(0.3)

        st, bad = api.call("POST", "/v1/demo/orders?wait=10s", {"order": "bad-1", "fail": "permanent"})
        if st != 400:
            fail("order bad-1 should be rejected: %s %s" % (st, bad))
        xss_order = '"><img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
        api.call("POST", "/v1/demo/orders?wait=10s", {"order": xss_order, "fail": "permanent"})
        hold = os.path.join(workdir, "hold")
        open(hold, "w").close()
        st, stuck = api.call("POST", "/v1/demo/orders", {"order": "stuck-1", "hold": hold})
        if st != 202:
            fail("order stuck-1: %s %s" % (st, stuck))
        api.wait_status(stuck["command_id"], "retrying")
        # Park and replay need commands:admin; reading does not.
        reader = Api(base, READER)
        st, body = reader.call("POST", "/v1/commands/%s/park" % stuck["command_id"], {})
        if st != 403 or body["error"]["code"] != "PERMISSION_DENIED":
            fail("a reader parked a command: %s %s" % (st, body))
        st, body = reader.call("POST", "/v1/commands/%s/replay" % stuck["command_id"], {})
        if st != 403:
            fail("a reader replayed a command: %s %s" % (st, body))
        st, body = reader.call("GET", "/v1/commands?status=retrying")
        if st != 200 or [c["id"] for c in body["commands"]] != [stuck["command_id"]]:
            fail("a reader's list of stuck commands: %s %s" % (st, body))
        st, _ = api.call("POST", "/v1/messages:batchPut?wait=10s", {"msgs": [{
            "id": "xss-1", "source": "urn:test", "specversion": "1.0", "type": "demo.note",
            "data": {"text": "<script>window.__xss=3</script>",
                     "img": '"><img src=x onerror="window.__xss=4">'}}]})
        if st != 200:
            fail("messages:batchPut: %s" % st)
        st, body = api.call("PUT", "/v1/registry/instances?wait=10s",
                            {"url": "http://127.0.0.1:9/shop", "tags": ["<b>shop</b>"]})
        if st != 200:
            fail("registry instance: %s %s" % (st, body))
        driver = browser(workdir)
        driver.get(console)
        wait_for(driver, "the sign-in form", lambda d: d.find_element(By.ID, "token").is_displayed())
        shot(driver, "login")
        act(driver, "the token field", By.ID, "token", lambda e: e.send_keys(token))
        click(driver, "sign in", By.ID, "login-button")

        # Overview: this node, the counts, the chart after a few refreshes.
        # (texts read inside wait_for: the overview re-renders every 3 s)
        rows = wait_for(driver, "a node", lambda d: [
            r.text for r in d.find_elements(By.CSS_SELECTOR, "tr.node-row")])
        if "dev" not in rows[0] or "alive" not in rows[0]:
            fail("the node row: %s" % rows[0])
        wait_for(driver, "the stuck count", lambda d: d.find_element(By.ID, "count-retrying").text.startswith("1"))
        wait_for(driver, "the rejected count", lambda d: d.find_element(By.ID, "count-rejected").text.startswith("2"))
        wait_for(driver, "the consumers' rates", lambda d: "demo.orders" in d.find_element(By.ID, "page").text)
        # Some traffic for the rates and the chart (each order has a follow-up).
        for i in range(30):
            api.call("POST", "/v1/demo/orders", {"order": "load-%d" % i})
            time.sleep(0.15)
        time.sleep(4)  # more samples for the rates and the chart
        # The consumers as every node reports them with its heartbeat: the
        # applied count covers the load, and each partition names its owner.
        node_id = api.call("GET", "/v1/nodes")[1]["nodes"][0]["id"]
        deadline = time.time() + WAIT
        while True:
            st, cons = api.call("GET", "/v1/consumers")
            orders = [c for c in cons.get("consumers", []) if c["name"] == "demo.orders"]
            if (st == 200 and orders and orders[0]["counts"].get("applied", 0) >= 31
                    and orders[0]["partitions"]
                    and all(p["node"] == node_id for p in orders[0]["partitions"])
                    and orders[0]["retrying_partitions"] == 1):
                break
            if time.time() > deadline:
                fail("GET /v1/consumers: %s %s" % (st, cons))
            time.sleep(0.5)
        parts = wait_for(driver, "the partitions and their owner", lambda d: [
            r.text for r in d.find_elements(By.CSS_SELECTOR, "tr.partition-row") if "demo.orders" in r.text])
        if not all(node_id[:8] in r and "(dev)" in r for r in parts):
            fail("a partition without its owner node: %s" % parts)
        wait_for(driver, "a retrying partition", lambda d: any(
            "retrying" in r.text for r in d.find_elements(By.CSS_SELECTOR, "tr.partition-row")))
        wait_for(driver, "the consumer's row", lambda d: d.find_element(
            By.CSS_SELECTOR, "tr.consumer-row[data-consumer='demo.orders']"))
        shot(driver, "overview")
        if wait_for(driver, "the count", lambda d: d.find_element(By.ID, "count-retrying").text).split()[0] != "1":
            fail("the overview's stuck count")

        # Commands: the rejected ones, filtered; markup shows as text.
        goto(driver, base, "#/commands?status=rejected")
        wait_for(driver, "the rejected commands",
                 lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.command-row")) >= 2)
        table = wait_for(driver, "the list", lambda d: d.find_element(By.ID, "list").text)
        if "cannot be placed" not in table or "<script>window.__xss=2</script>" not in table:
            fail("the rejected list lacks the orders or did not show markup as text:\n" + table)
        if "applied" in table.split("last error")[-1].split():
            fail("the status filter let an applied command through")
        no_xss(driver)
        shot(driver, "commands")

        # The form's filters: type and key.
        goto(driver, base, "#/commands")
        # The unfiltered page's own form (the rejected page's had a status).
        wait_for(driver, "the filter form", lambda d: d.find_element(
            By.CSS_SELECTOR, "#filters select[name=status]").get_attribute("value") == "")
        act(driver, "the key field", By.CSS_SELECTOR, "#filters input[name=key]",
            lambda e: e.send_keys("stuck-1"))
        click(driver, "Filter", By.ID, "apply-filters")
        wait_for(driver, "the stuck command by key",
                 lambda d: [r for r in d.find_elements(By.CSS_SELECTOR, "tr.command-row")
                            if r.get_attribute("data-id") == stuck["command_id"]]
                 and len(d.find_elements(By.CSS_SELECTOR, "tr.command-row")) == 1)

        # The stuck command: park, replay, applied.
        goto(driver, base, "#/command/" + stuck["command_id"])
        wait_for(driver, "the stuck command's detail",
                 lambda d: "retrying" in d.find_element(By.ID, "page").text
                 and "is on hold" in d.find_element(By.ID, "page").text)
        data_text = wait_for(driver, "the data", lambda d: d.find_element(By.CSS_SELECTOR, "pre.command-data").text)
        if "stuck-1" not in data_text:
            fail("the command's data: %s" % data_text)
        shot(driver, "command")
        click(driver, "Park", By.ID, "park")
        WebDriverWait(driver, WAIT).until(lambda d: d.switch_to.alert).accept()
        wait_for(driver, "the park's answer",
                 lambda d: "Park: applied" in d.find_element(By.ID, "steer-result").text)
        api.wait_status(stuck["command_id"], "parked")
        os.unlink(hold)
        click(driver, "Replay", By.ID, "replay")
        WebDriverWait(driver, WAIT).until(lambda d: d.switch_to.alert).accept()
        wait_for(driver, "the replay's answer",
                 lambda d: "Replay: applied" in d.find_element(By.ID, "steer-result").text)
        wait_for(driver, "the replayed command applied",
                 lambda d: "status applied" in d.find_element(By.ID, "page").text)
        api.wait_status(stuck["command_id"], "applied")

        # The story of ok-1: request, command, event, follow-up, its event.
        goto(driver, base, "#/story/" + ok["command_id"])
        nodes = wait_for(driver, "the story",
                         lambda d: len(d.find_elements(By.CSS_SELECTOR, ".story-node")) >= 2
                         and d.find_elements(By.CSS_SELECTOR, ".story-node"))
        text = wait_for(driver, "the story", lambda d: d.find_element(By.ID, "page").text)
        for want in ("demo.place", "demo.placed", "demo.ship", "demo.shipped", "order-ok-1 v1",
                     "order-ok-1 v2", "FOLLOW-UP COMMAND", "REQUEST", "ray " + ok_ray):
            if want not in text:
                fail("the story lacks %r:\n%s" % (want, text))
        request = wait_for(driver, "the request", lambda d: d.find_element(By.ID, "story-request").text)
        if "POST /v1/demo/orders" not in request or " by " not in request:
            fail("the story's request lacks its method, path and token: %r" % request)
        child = wait_for(driver, "the follow-up", lambda d: [(c.get_attribute("data-id"), c.text) for c in d.find_elements(
            By.XPATH, "//div[contains(@class, 'story-node') and @data-id='%s']"
            "/following-sibling::ul//div[contains(@class, 'story-node')]" % ok["command_id"])])
        if child[0][0] != ships[0]["id"] or "applied" not in child[0][1]:
            fail("the follow-up is not nested under its cause, applied:\n" + text)
        shot(driver, "story")

        # Messages: the CloudEvent, markup as text.
        goto(driver, base, "#/messages/xss-1")
        pre = wait_for(driver, "the message", lambda d: d.find_element(By.ID, "message-event"))
        if "<script>window.__xss=3</script>" not in pre.text or "onerror" not in pre.text:
            fail("the message's data did not show as text: " + pre.text)
        no_xss(driver)
        shot(driver, "messages")

        # Registry: the instance, markup as text.
        goto(driver, base, "#/registry")
        wait_for(driver, "the registry", lambda d: "<b>shop</b>" in d.find_element(By.ID, "page").text)
        no_xss(driver)
        shot(driver, "registry")

        # Nothing the page did broke its own policy.
        logs = [e["message"] for e in driver.get_log("browser")]
        bad = [m for m in logs if "Content Security Policy" in m or "Refused" in m]
        if bad:
            fail("the browser reports: %s" % bad)
    finally:
        if driver:
            driver.quit()
        stop_dev(proc)
    shutil.rmtree(workdir, ignore_errors=True)
    print("console browser test: ok")


if __name__ == "__main__":
    main()

"""The interactive attention view (nanogpt2/attention_view.py, tools/attention_view.py), checked in a real browser.

The browser tests drive headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages ending in a NUL byte, commands on the browser's fd 3, replies on its fd 4), so a real mouse moves over
the page and nothing beyond the standard library is needed. Where no Chromium is installed they skip and say so
(Debian: apt-get install chromium; .ci/run installs it).
"""
import base64
import fcntl
import json
import os
import re
import runpy
import select
import shutil
import subprocess
import time

import pytest
import torch

from nanogpt2 import GPT2LMHeadModel, get_tokenizer
from nanogpt2.attention_view import attention_html, attention_page, token_texts
from nanogpt2.tokenizer import quote_token

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = os.environ.get("NANOGPT2_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason=f"no headless browser: none of {', '.join(BROWSERS)} "
                                   "is on PATH (Debian: apt-get install chromium; or set NANOGPT2_CHROMIUM)")


@pytest.fixture(scope="module")
def model():
    return GPT2LMHeadModel.from_pretrained("shakespeare-tiny").eval()  # bundled: 4 layers x 4 heads


def page_data(page: str) -> dict:
    """The JSON the page carries (tokens, labels, heads[h][q][k] for k <= q)."""
    m = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def pattern(model, ids, layer, **kwargs) -> torch.Tensor:
    _, cache = model.run_with_cache(ids, names=[f"h.{layer}.attn.pattern"], **kwargs)
    return cache[f"h.{layer}.attn.pattern"]


# ---- the page's data, without a browser -------------------------------------------------------

def test_page_holds_the_models_weights_and_tokens(model):
    ids = torch.tensor([get_tokenizer().encode(TEXT)])
    page = attention_html(model, TEXT, layer=2)
    data = page_data(page)
    probs = pattern(model, ids, 2)[0]  # (H, T, T)
    T = ids.shape[1]
    assert data["tokens"] == token_texts(ids[0].tolist()) and "".join(data["tokens"]) == TEXT
    assert data["labels"][3] == "'\\n'" and data["labels"][5] == "' soft'"  # as every tool labels tokens
    assert [len(r) for r in data["heads"][0]] == list(range(1, T + 1))  # causal triangle: keys 0..q
    for h in range(probs.shape[0]):
        for q in range(T):
            torch.testing.assert_close(torch.tensor(data["heads"][h][q], dtype=torch.float64),
                                       probs[h, q, : q + 1].double(), atol=5e-5 + 1e-9, rtol=0)
    assert page == attention_html(model, ids, layer=2) == attention_html(model, ids[0].tolist(), layer=2)


def test_page_is_self_contained():
    page = attention_page(torch.ones(2, 1, 1), ["a"], "t")
    assert not re.search(r"https?://|//cdn|\bsrc=|\bhref=|@import|url\(", page)


def test_a_padded_row_shows_what_the_row_shows_alone(model):
    tok = get_tokenizer()
    short, long = tok.encode("But soft"), tok.encode("what light through yonder window")
    pad = len(long) - len(short)
    ids = torch.tensor([[0] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    padded = page_data(attention_html(model, ids, layer=1, attention_mask=mask, row=0))
    alone = page_data(attention_html(model, short, layer=1))
    assert padded["tokens"] == alone["tokens"] == token_texts(short)  # padding dropped
    for h in range(len(alone["heads"])):
        for a, b in zip(padded["heads"][h], alone["heads"][h]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1.5e-4, rtol=0)  # 4-decimal rounding
    assert page_data(attention_html(model, ids, layer=1, attention_mask=mask, row=1))["tokens"] == token_texts(long)


def test_bad_layer_and_row_name_the_value_and_range(model):
    with pytest.raises(ValueError, match=r"layer 4 out of range \[0, 4\) \(this model has 4 layers\)"):
        attention_html(model, TEXT, layer=4)
    with pytest.raises(ValueError, match=r"layer -1 out of range \[0, 4\)"):
        attention_html(model, TEXT, layer=-1)
    with pytest.raises(ValueError, match=r"row 2 out of range \[0, 2\) \(the batch has 2 sequences\)"):
        attention_html(model, torch.zeros(2, 3, dtype=torch.long), layer=0, row=2)
    with pytest.raises(ValueError, match=r"row 0 is all padding"):
        attention_html(model, torch.zeros(2, 3, dtype=torch.long), layer=0,
                       attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]))


def test_hostile_tokens_stay_inside_the_json():
    tokens = ["</script>", '"', "<b>x</b>", "&amp;", "{title}", "<!--"]
    page = attention_page(torch.tril(torch.ones(1, 6, 6)) / torch.arange(1, 7)[:, None], tokens, "<i>{data}</i>")
    assert page.count("</script>") == 2  # the data's and the script's own closing tags, nothing else
    assert "<b>" not in page and "<!--" not in page and "<i>" not in page
    assert "&lt;i&gt;{data}&lt;/i&gt;" in page  # the title is escaped and not filled in a second time
    assert page_data(page)["tokens"] == tokens


def test_tool_writes_a_page_and_names_a_bad_layer(tmp_path, capsys):
    main = runpy.run_path(os.path.join(TOOLS, "attention_view.py"), run_name="tool")["main"]
    out = tmp_path / "view.html"
    assert main(["--model", "shakespeare-tiny", "--text", "To be, or not to be", "--layer", "1", "--out", str(out)]) == 0
    assert page_data(out.read_text(encoding="utf-8"))["tokens"] == token_texts(get_tokenizer().encode("To be, or not to be"))
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--model", "shakespeare-tiny", "--layer", "9", "--out", str(tmp_path / "x.html")])
    assert e.value.code == 2 and "layer 9 out of range [0, 4)" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


# ---- in a real browser ------------------------------------------------------------------------

class Browser:
    """Headless Chromium and one page, driven over the DevTools protocol (chromedevtools.github.io/devtools-protocol)
    on a pipe. send() returns a command's result; events that arrive meanwhile are kept in self.events."""

    def __init__(self, binary: str, profile_dir: str, width: int = 1100, height: int = 760):
        to_browser, self.writer = self._high(*os.pipe())
        self.reader, from_browser = self._high(*os.pipe())
        self.log = open(os.path.join(profile_dir, "chromium.log"), "wb")
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={profile_dir}", "about:blank"]
        # the browser reads fd 3 and writes fd 4: bash (dash takes no fd above 9) moves the pipe ends there and execs it
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', *args],
                                     pass_fds=(to_browser, from_browser), stdout=self.log, stderr=self.log)
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.next_id, self.events, self.session = b"", 0, [], None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.enable")
        self.send("Runtime.enable")

    @staticmethod
    def _high(*fds):
        """The fds moved to numbers >= 10, clear of the 3 and 4 the shell redirects into."""
        moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
        for fd in fds:
            os.close(fd)
        return moved

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.reader], [], [], left)[0]:
                raise TimeoutError("no answer from chromium (see chromium.log in the test's tmp dir)")
            chunk = os.read(self.reader, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, timeout: float = 10.0, **params) -> dict:
        self.next_id += 1
        command = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            command["sessionId"] = self.session
        os.write(self.writer, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._message(deadline)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._message(deadline))

    def open(self, path: str):
        self.events.clear()
        self.send("Page.navigate", url=f"file://{os.path.abspath(path)}")
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list:
        """Uncaught exceptions and console errors the page has raised so far."""
        return [e["params"] for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")]

    def mouse(self, kind: str, x: float, y: float):
        extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, x: float, y: float):
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def rect(self, selector: str) -> dict:
        return self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                       f" return {{x: r.x, y: r.y, w: r.width, h: r.height}}; }})()")

    def screenshot(self, path: str) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        with open(path, "wb") as f:
            f.write(png)
        return png

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.reader, self.writer):
            os.close(fd)
        self.log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no headless browser")
    b = Browser(CHROMIUM, str(tmp_path_factory.mktemp("chromium-profile")))
    yield b
    b.close()


def hover_cell(browser, selector: str, q: int, k: int, T: int):
    """Move the mouse to the centre of cell (query q, key k) of the map drawn by the canvas `selector`."""
    r = browser.rect(selector)
    browser.mouse("mouseMoved", r["x"] + (k + 0.5) * r["w"] / T, r["y"] + (q + 0.5) * r["h"] / T)


def readout(browser):
    """(head, query, query label, key, key label, weight) as the readout shows them."""
    text = browser.js("document.getElementById('readout').textContent")
    m = re.fullmatch(r"head (\d+) · query (\d+) (.*) · key (\d+) (.*) · weight (\d\.\d{3})", text)
    assert m, f"readout reads {text!r}"
    h, q, ql, k, kl, w = m.groups()
    return int(h), int(q), ql, int(k), kl, float(w)


@needs_browser
def test_hover_reads_query_key_and_weight_in_a_browser(model, browser, tmp_path):
    layer, head, q, k = 1, 2, 10, 3
    ids = torch.tensor([get_tokenizer().encode(TEXT)])
    T = ids.shape[1]
    probs = pattern(model, ids, layer)[0]  # (H, T, T)
    path = tmp_path / "view.html"
    path.write_text(attention_html(model, TEXT, layer), encoding="utf-8")
    browser.open(str(path))
    assert browser.js("document.body.dataset.ready") == "1" and browser.errors() == []
    assert browser.js("document.querySelectorAll('#grid canvas').length") == 4

    r = browser.rect(f'#grid figure[data-head="{head}"]')  # click head 2's thumbnail: it becomes the big map
    browser.click(r["x"] + r["w"] / 2, r["y"] + r["h"] / 2)
    assert browser.js("document.getElementById('big-title').textContent") == f"head {head}"

    texts = token_texts(ids[0].tolist())
    hover_cell(browser, "#big", q, k, T)
    assert readout(browser)[:5] == (head, q, quote_token(texts[q]), k, quote_token(texts[k]))
    assert abs(readout(browser)[5] - float(probs[head, q, k])) < 6e-4  # 3 decimals of a 4-decimal page value
    weights = browser.js("[...document.querySelectorAll('#tokens span[data-pos]')].map(s => s.dataset.weight)")
    for i in range(T):  # the token view: keys 0..q coloured by the query's weights, later tokens blank
        if i > q:
            assert weights[i] == "", i
        else:
            assert abs(float(weights[i]) - float(probs[head, q, i])) < 6e-4, i
    assert browser.js("document.querySelector('#tokens span.query').dataset.pos") == str(q)

    hover_cell(browser, '#grid figure[data-head="0"] canvas', 5, 5, T)  # the thumbnails read out too
    assert readout(browser)[:4] == (0, 5, quote_token(texts[5]), 5)

    hover_cell(browser, "#big", 12, 4, T)  # leave the mouse on a cell for the picture
    png = browser.screenshot(str(tmp_path / "view.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a drawn page, not a blank one
    assert browser.errors() == []


@needs_browser
def test_hostile_tokens_render_as_text_in_a_browser(browser, tmp_path):
    tokens = ["</script>", '"', "<b>x</b>", "&amp;", " <!--", "\n"]
    T = len(tokens)
    probs = torch.tril(torch.ones(2, T, T)) / torch.arange(1, T + 1)[:, None]  # uniform over keys 0..q
    path = tmp_path / "hostile.html"
    path.write_text(attention_page(probs, tokens, "<script>alert(1)</script>"), encoding="utf-8")
    browser.open(str(path))
    assert browser.js("document.body.dataset.ready") == "1" and browser.errors() == []
    assert browser.js("document.querySelector('h1').textContent") == "<script>alert(1)</script>"
    assert browser.js("document.querySelectorAll('b').length") == 0  # "<b>x</b>" stayed text
    assert browser.js("document.getElementById('tokens').textContent") == "".join(tokens).replace("\n", "↵\n")
    hover_cell(browser, "#big", 3, 0, T)
    assert readout(browser) == (0, 3, "'&amp;'", 0, "'</script>'", 0.25)
    hover_cell(browser, "#big", 2, 1, T)
    assert readout(browser)[2:5] == ("'<b>x</b>'", 1, "'\"'")

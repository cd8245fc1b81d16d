"""The server's grounding boxes (the `boxes` field on a reply's message, and on a stream's last
chunk) and the chat page at `/` (qwen2vl_jax/serving/page.py, static/), in headless Chromium.

Two servers on free localhost ports, both with an API key and the Host check a loopback
qwen2vl-serve has: the demo model, for the page's upload-ask-stream path and an end-to-end
check of the field; and the same app over a batcher that answers every request with a scripted
token sequence (the model's reply forced: the demo model's boxes are coarse), so the boxes and
their pixels are known.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import threading
import time

import numpy as np
import pytest

from qwen2vl_jax import grounding

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "page-key"
# The circle every test image shows: centre and radius in pixels of a 320 x 200 image.
WIDTH, HEIGHT, CIRCLE = 320, 200, (200, 120, 40)
CIRCLE_BOX = [CIRCLE[0] - CIRCLE[2], CIRCLE[1] - CIRCLE[2], CIRCLE[0] + CIRCLE[2], CIRCLE[1] + CIRCLE[2]]


def circle_png(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (245, 245, 245))
    x, y, r = CIRCLE
    ImageDraw.Draw(img).ellipse([x - r, y - r, x + r, y + r], fill=(220, 40, 40))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def question(*images: bytes, text: str = "Where is the circle?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(d)}} for d in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


# ---------------------------------------------------------------------------- servers
class Scripted:
    """A batcher that answers every request with the tokens of `text`, then the EOS: the app,
    the detokenizer and the boxes run as they do over a model."""

    max_context = 384
    active_slots = queue_depth = 0
    alive = True
    prefix_cache = None  # the batcher's interface: no prompt prefixes kept

    def __init__(self, tokenizer, eos: int):
        self.tokenizer, self.eos = tokenizer, eos
        self.text = ""

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def submit(self, job) -> None:
        from qwen2vl_jax.serving.scheduler import Event

        tokens = self.tokenizer.encode(self.text)

        def run():
            for t in tokens:
                job.emit(Event(token=t))
                time.sleep(0.002)  # a stream of separate chunks, as from a model
            job.emit(Event(token=self.eos, finish="stop"))

        threading.Thread(target=run, daemon=True).start()


@dataclasses.dataclass
class Served:
    url: str
    name: str
    service: object

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def serve(model, processor, name: str, batcher=None):
    from qwen2vl_jax.serving.app import ServerThread, build_service, create_app
    from qwen2vl_jax.serving.prompts import Service
    from qwen2vl_jax.serving.settings import Settings

    settings = Settings(model_name=name, api_key=KEY, max_images=3, allowed_hosts=("127.0.0.1",))
    if batcher is None:
        service = build_service(model, processor, max_batch=2, max_context=384, settings=settings, warm_up=False)
    else:
        service = Service(model, processor, batcher, settings)
    server = ServerThread(create_app(service))
    return server, Served(server.__enter__(), name, service)


@pytest.fixture(scope="module")
def demo_model():
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    return Qwen2VL.from_pretrained(DEMO_DIR, dtype="float32"), Processor.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def demo(demo_model):
    server, served = serve(*demo_model, "demo")
    yield served
    server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def scripted(demo_model):
    model, processor = demo_model
    batcher = Scripted(processor.tokenizer, eos=processor.tokenizer.token_to_id("<|im_end|>"))
    server, served = serve(model, processor, "scripted", batcher)
    served.batcher = batcher
    yield served
    server.__exit__(None, None, None)


# ---------------------------------------------------------------------------- the boxes field
def test_reply_carries_boxes_in_the_request_images_pixels(scripted):
    """Non-streamed and streamed, through the openai client: the text keeps the markup, the
    boxes are in pixels of the last image as sent (here 640 x 400, the model saw it resized)."""
    answer = ("It is " + grounding.box_markup("the circle", [400, 160, 480, 240], 640, 400)
              + " and " + grounding.REF_START + "cut" + grounding.REF_END + grounding.BOX_START + "(1,2")
    scripted.batcher.text = answer
    want = [{"label": "the circle", "grid": [625, 400, 750, 600], "box": [400.0, 160.0, 480.0, 240.0], "image": 1}]
    client = scripted.client()
    messages = question(circle_png(50, 40), circle_png(640, 400))

    r = client.chat.completions.create(model="scripted", messages=messages, max_tokens=64)
    message = r.choices[0].message
    assert message.content == answer  # markup kept, the unfinished box too
    assert message.model_extra["boxes"] == want  # the unfinished box is not one

    text, boxes, finish = "", None, None
    for chunk in client.chat.completions.create(model="scripted", messages=messages, max_tokens=64, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if (choice.delta.model_extra or {}).get("boxes") is not None:
                assert boxes is None and choice.finish_reason == "stop"  # once, on the last chunk
                boxes = choice.delta.model_extra["boxes"]
            finish = choice.finish_reason or finish
    assert (text, boxes, finish) == (answer, want, "stop")

    # no image: the model's grid only
    scripted.batcher.text = answer
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Where?"}])
    assert r.choices[0].message.model_extra["boxes"] == [{"label": "the circle", "grid": [625, 400, 750, 600]}]


def test_demo_model_reply_has_a_well_formed_boxes_field(demo):
    r = demo.client().chat.completions.create(model="demo", messages=question(circle_png()), max_tokens=24)
    message = r.choices[0].message
    boxes = message.model_extra["boxes"]
    assert isinstance(boxes, list)
    assert boxes == grounding.boxes_for_images(message.content, [(WIDTH, HEIGHT)])[0]
    for b in boxes:
        assert b["image"] == 0 and len(b["box"]) == 4


# ---------------------------------------------------------------------------- the page over HTTP
def test_page_is_served_as_static_files(scripted):
    page = httpx.get(scripted.url + "/")  # no key needed: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    scripts = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', page.text.replace('href="data:,"', ""))
    assert scripts and all(s.startswith("/static/") for s in scripts)  # nothing from elsewhere
    for path in scripts:
        assert httpx.get(scripted.url + path).status_code == 200
    js = httpx.get(scripted.url + "/static/page.js").text
    assert "http://" not in js and "https://" not in js
    for bad in ("/static/nope.js", "/static/..%2fapp.py", "/static/index.html"):
        assert httpx.get(scripted.url + bad).status_code == 404


def test_the_pages_own_requests_pass_the_origin_check(scripted):
    """A browser sends Origin on its page's POSTs: this server's own origin is let through, any
    other still refused."""
    scripted.batcher.text = "ok"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    auth = {"Authorization": f"Bearer {KEY}"}
    own = httpx.post(scripted.url + "/v1/chat/completions", json=body, headers={**auth, "Origin": scripted.url})
    assert own.status_code == 200, own.text
    other = httpx.post(scripted.url + "/v1/chat/completions", json=body, headers={**auth, "Origin": "http://evil.test"})
    assert other.status_code == 403
    rebound = httpx.post(scripted.url + "/v1/chat/completions", json=body,
                         headers={**auth, "Host": "evil.test", "Origin": "http://evil.test"})
    assert rebound.status_code == 400  # a page rebinding its name here fails the Host check first


# ---------------------------------------------------------------------------- the page in a browser
@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800",
                 "--disable-gpu", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def wait_for(browser, condition, timeout: float = 60.0, what: str = "the page"):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            logs = browser.find_element("id", "log").text
            raise AssertionError(f"timed out waiting for {what}; status {status(browser)!r}; log {logs!r}")
        time.sleep(0.05)


def status(browser) -> str:
    return browser.find_element("id", "status").text


def ask_on_page(browser, served, image_path, text: str) -> str:
    """Opens the page, types the key, attaches the image, asks; -> the status once done."""
    from selenium.webdriver.common.keys import Keys

    browser.get(served.url + "/")
    browser.execute_script("sessionStorage.clear()")
    key = browser.find_element("id", "key")
    key.clear()
    key.send_keys(KEY, Keys.TAB)  # 'change': the page asks /v1/models with it
    wait_for(browser, lambda: browser.find_element("id", "model").text == served.name, 10, "the model's name")
    upload = browser.find_element("id", "file")
    browser.execute_script("arguments[0].style.display = 'block'", upload)  # a hidden input behind its label
    upload.send_keys(str(image_path))
    browser.execute_script("arguments[0].style.display = ''", upload)
    wait_for(browser, lambda: browser.execute_script(
        "const p = document.getElementById('picture'); return p.complete && p.naturalWidth > 0"), 10, "the image")
    browser.find_element("id", "question").send_keys(text)
    browser.find_element("id", "ask").click()
    return wait_for(browser, lambda: status(browser).startswith(("done", "error")) and status(browser),
                    what="the answer")


def box_elements(browser) -> list[dict]:
    """Each drawn box: its label and its rectangle in pixels of the image as shown."""
    return browser.execute_script("""
        const at = document.getElementById('picture').getBoundingClientRect();
        return [...document.querySelectorAll('#overlay .box')].map(b => {
            const r = b.getBoundingClientRect();
            return {label: b.querySelector('.label').textContent, colour: getComputedStyle(b).borderTopColor,
                    rect: [r.left - at.left, r.top - at.top, r.right - at.left, r.bottom - at.top],
                    shown: [at.width, at.height]};
        });""")


def check_boxes_drawn(browser, boxes: list[dict], width: int, height: int) -> None:
    drawn = box_elements(browser)
    assert len(drawn) == len([b for b in boxes if "box" in b])
    for element, box in zip(drawn, (b for b in boxes if "box" in b)):
        assert element["label"] == (box["label"] or "box")
        sx, sy = element["shown"][0] / width, element["shown"][1] / height
        want = [box["box"][0] * sx, box["box"][1] * sy, box["box"][2] * sx, box["box"][3] * sy]
        assert np.allclose(element["rect"], want, atol=1.5), (element, want)


def test_page_upload_ask_stream_with_the_demo_model(browser, demo, tmp_path):
    """The real path: upload, ask, the answer streams from the demo model through the page;
    it is the API's answer to the same request, and any box it gives is drawn where it says."""
    image = tmp_path / "circle.png"
    image.write_bytes(circle_png())
    done = ask_on_page(browser, demo, image, "Where is the circle?")
    assert done.startswith("done (stop"), done
    r = demo.client().chat.completions.create(model="demo", messages=question(image.read_bytes()))
    want = r.choices[0].message
    shown = browser.find_elements("css selector", "#log li.assistant")[-1].text
    assert shown and shown == want.content.replace(grounding.REF_START, "").replace(grounding.REF_END, "") \
        .replace(grounding.BOX_START, "").replace(grounding.BOX_END, "")
    check_boxes_drawn(browser, want.model_extra["boxes"], WIDTH, HEIGHT)
    assert [e for e in browser.get_log("browser") if e["source"] == "javascript"] == []  # no script errors


def test_page_draws_a_grounding_answer_over_the_circle(browser, scripted, tmp_path):
    """The answer forced to ground the circle: the box element sits over the circle, labelled,
    in the label's colour, and the text marks the label."""
    image = tmp_path / "circle.png"
    image.write_bytes(circle_png())
    scripted.batcher.text = "The circle is here: " + grounding.box_markup("the circle", CIRCLE_BOX, WIDTH, HEIGHT)
    done = ask_on_page(browser, scripted, image, "Where is the circle?")
    assert done == "done (stop, 1 box)"
    (element,) = box_elements(browser)
    assert element["label"] == "the circle" and element["colour"] == "rgb(230, 25, 75)"
    scale = element["shown"][0] / WIDTH
    assert np.allclose(element["rect"], [v * scale for v in CIRCLE_BOX], atol=1.5 + scale * WIDTH / 1000)
    ref = browser.find_element("css selector", "#log li.assistant .ref")
    assert ref.text == "the circle"
    assert browser.find_element("css selector", "#log li.assistant").text.startswith("The circle is here: the circle")

"""The FD signal viewer on real episodes (scripted turns through the real rollout, real Rocq tools, constant
feedback) and a real tiny random model; the page checked by parsing it and in a real headless Chromium."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser

import pytest
import torch

from agent.episode import EpisodeWriter, read_episodes
from agent.feedback.sources import ConstantFeedback
from agent.models import load_model, load_tokenizer
from agent.rollout import Rollout, RolloutConfig
from tests.agent.conftest import ScriptedBackend
from tests.agent.test_rollout import call
from tests.env.test_rocq import PROBLEM
from trainer.viewer import main

HOSTILE = "Look: </script><script>alert(1)</script> & <img src=x onerror=alert(2)> \"q\" 'a'"
FEEDBACK = "Be concise. </script><b>not bold</b> & done"


@pytest.fixture(scope="module")
def episodes(tmp_path_factory, rocq):
    """Episode 0 without feedback, episode 1 with constant feedback; both have a tool turn."""
    tokenizer = load_tokenizer("tiny-qwen3")
    turns = [HOSTILE + "\n\tthen " + call("rg_in_stdlib", pattern="Rplus_comm"), "Done.\n  Bye."]
    path = tmp_path_factory.mktemp("viewer") / "episodes.jsonl"
    writer = EpisodeWriter(path)
    for feedback in (None, ConstantFeedback(FEEDBACK)):
        backend = ScriptedBackend(tokenizer, lambda prompt, turn: turns[turn - 1],
                                  tokenizer.convert_tokens_to_ids("<|im_end|>"))
        rollout = Rollout(backend, tokenizer, rocq, RolloutConfig(), model_name="tiny-qwen3", feedback=feedback)
        writer.write(asyncio.run(rollout.run(PROBLEM)))
    return path


class Page(HTMLParser):
    """Every element with its attributes and the text directly inside it."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self.open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        self.open.append(element)

    def handle_endtag(self, tag):
        while self.open and self.open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        if self.open:
            self.open[-1]["text"] += data

    def with_class(self, name):
        return [e for e in self.elements if name in e["attrs"].get("class", "").split()]


def view(episodes, tmp_path, *args):
    out = tmp_path / "page.html"
    assert main(["--episodes", str(episodes), "--model", "tiny-qwen3", "--out", str(out), *args]) == 0
    return out


def plain_forward(episode, student, teacher):
    """Per generated response token: log p_teacher - log p_student, and the teacher's and student's top 5
    (ids, probabilities), from one plain forward of each model on its whole sequence."""
    response = episode.token_ids[episode.prompt_len:]
    prompts = (episode.token_ids[:episode.prompt_len], episode.feedback.teacher_prompt_ids)
    trained = [j for j, m in enumerate(episode.loss_mask[episode.prompt_len:]) if m]
    logps, tops = [], []
    with torch.no_grad():
        for model, prompt in zip((student, teacher), prompts, strict=True):
            logp = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            rows = logp[[len(prompt) + j - 1 for j in trained]]
            logps.append(rows.gather(-1, torch.tensor([[response[j]] for j in trained]))[:, 0])
            tops.append(rows.topk(5, dim=-1))
    ratios = (logps[1] - logps[0]).tolist()
    return ratios, (tops[1].indices.tolist(), tops[1].values.exp().tolist()), \
        (tops[0].indices.tolist(), tops[0].values.exp().tolist())


def log_ratios_by_plain_forward(episode, student, teacher):
    return plain_forward(episode, student, teacher)[0]


def test_one_element_per_generated_token_with_the_teachers_log_ratio(episodes, tmp_path):
    page = Page(view(episodes, tmp_path).read_text())
    episode = list(read_episodes(episodes))[1]  # the first episode with feedback
    tokens = page.with_class("tok")
    assert len(tokens) == episode.num_generated > 0
    assert [e for e in page.elements if "data-logratio" in e["attrs"]] == tokens
    model = load_model("tiny-qwen3")
    expected, teacher_top, student_top = plain_forward(episode, model, model)
    shown = [float(e["attrs"]["data-logratio"]) for e in tokens]
    assert max(abs(v) for v in expected) > 0.01  # the feedback moves the teacher
    assert shown == pytest.approx(expected, abs=1e-4)
    # the tokens' text, in order, is the generated text; the grey tool turns hold the rest of the response
    tokenizer = load_tokenizer("tiny-qwen3")
    response = episode.token_ids[episode.prompt_len:]
    trained = episode.loss_mask[episode.prompt_len:]
    assert "".join(e["text"] for e in tokens) == "".join(
        tokenizer.decode([t], skip_special_tokens=False) for t, m in zip(response, trained, strict=True) if m)
    tools = page.with_class("tool")
    assert tools and all("data-logratio" not in e["attrs"] and "style" not in e["attrs"] for e in tools)
    assert "<tool_response>" in "".join(e["text"] for e in tools)
    assert "Rplus_comm" in "".join(e["text"] for e in tools)
    assert len(episode.token_ids) - episode.prompt_len > episode.num_generated  # there were tool tokens to grey
    # one top-5 pair per token, probabilities in decreasing order
    data = json.loads(next(e for e in page.elements if e["attrs"].get("id") == "fd-data")["text"])
    assert len(data) == len(tokens)
    def visible(ids):
        return [tokenizer.decode([i]).replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")
                for i in ids]

    for n, (d, value) in enumerate(zip(data, expected, strict=True)):
        assert math.log(d["pt"]) - math.log(d["ps"]) == pytest.approx(value, abs=2e-3)
        for shown_top, (ids, probs) in ((d["t"], teacher_top), (d["s"], student_top)):
            assert [t for t, _ in shown_top] == visible(ids[n])
            assert [p for _, p in shown_top] == pytest.approx(probs[n], rel=1e-3)


def test_a_checkpoints_ema_teacher_is_the_teacher(episodes, tmp_path):
    from trainer.checkpoint import save_checkpoint

    student = load_model("tiny-qwen3")
    teacher = load_model("tiny-qwen3", seed=1)
    step = save_checkpoint(tmp_path / "run", 3, student, load_tokenizer("tiny-qwen3"),
                           {"teacher": teacher.state_dict()}, {})
    out = tmp_path / "page.html"
    assert main(["--episodes", str(episodes), "--model", str(step), "--teacher", str(step), "--out", str(out)]) == 0
    shown = [float(e["attrs"]["data-logratio"]) for e in Page(out.read_text()).with_class("tok")]
    episode = list(read_episodes(episodes))[1]
    assert shown == pytest.approx(log_ratios_by_plain_forward(episode, student, teacher), abs=1e-4)


def test_hostile_text_stays_text_and_nothing_is_loaded(episodes, tmp_path):
    text = view(episodes, tmp_path).read_text()
    page = Page(text)
    assert [e["tag"] for e in page.elements if e["tag"] in ("script", "img", "b")] == ["script", "script"]
    assert not [e for e in page.elements if any(a.startswith("on") for a in e["attrs"])]
    response = "".join(e["text"] for e in page.with_class("tok") + page.with_class("tool"))
    assert HOSTILE in "".join(e["text"] for e in page.elements if e["tag"] == "span")
    assert "alert(1)" in response
    assert page.with_class("feedback")[0]["text"].strip().endswith(FEEDBACK)
    # the tooltip data holds tokens such as "</" and "<|im_end|>": inside <script> they must stay escaped
    data = next(e for e in page.elements if e["attrs"].get("id") == "fd-data")["text"]
    assert "<" not in data and ">" not in data and "&" not in data
    assert any("<" in d["x"] for d in json.loads(data)) and any("&" in d["x"] for d in json.loads(data))
    # nothing from elsewhere: no attribute that loads, no CSS url() or @import, no request from the script
    loading = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background"}
    assert not [e for e in page.elements if loading & set(e["attrs"])]
    assert "url(" not in text and "@import" not in text and "fetch(" not in text and "XMLHttpRequest" not in text


def test_episode_without_feedback_or_out_of_range_is_a_clear_error(episodes, tmp_path, capsys):
    out = tmp_path / "page.html"
    for index, words in (("0", ["episode 0", "no feedback", "constant"]), ("2", ["--index 2", "out of range"])):
        with pytest.raises(SystemExit) as exit_info:
            main(["--episodes", str(episodes), "--model", "tiny-qwen3", "--index", index, "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()
    assert main(["--episodes", str(episodes), "--model", "tiny-qwen3", "--index", "1", "--out", str(out)]) == 0
    assert "episode 1 " in out.read_text()


# ---------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium: apt-get install chromium")


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args], capture_output=True,
                          text=True, timeout=120)


@needs_chromium
def test_in_chromium_every_generated_token_is_colored(episodes, tmp_path):
    from PIL import Image

    path = view(episodes, tmp_path)
    episode = list(read_episodes(episodes))[1]
    dom = Page(chromium("--dump-dom", path.as_uri()).stdout)  # the DOM after the page's scripts ran
    tokens = dom.with_class("tok")
    assert len(tokens) == episode.num_generated
    assert all(e["attrs"]["style"].startswith("background:rgb(") for e in tokens)
    assert len({e["attrs"]["style"] for e in tokens}) > 5
    png = tmp_path / "page.png"
    chromium(f"--screenshot={png}", "--window-size=1000,700", path.as_uri())
    image = Image.open(png).convert("RGB")
    assert image.size == (1000, 700)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 20  # text, the legend's gradient and the tokens' colors
    assert any(r > g + 60 and r > b + 60 for _, (r, g, b) in colors)  # a red token
    assert any(b > r + 60 for _, (r, g, b) in colors)  # a blue one


class DevTools:
    """Chrome DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, messages end with NUL)."""

    def __init__(self, url: str) -> None:
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" --headless --no-sandbox --disable-gpu --remote-debugging-pipe "$1" '
                         f"3<&{to_chrome} 4>&{from_chrome}", CHROMIUM, url],
            pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.session = b"", 0, None
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]

    def send(self, method: str, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._write)
        os.close(self._read)


@needs_chromium
def test_hovering_a_token_shows_teacher_and_student_top_5(episodes, tmp_path):
    page = view(episodes, tmp_path)
    browser = DevTools(page.as_uri())
    try:
        for _ in range(200):  # the first page is about:blank, then ours loads
            if browser.evaluate(f"location.href == {json.dumps(page.as_uri())} && document.readyState == 'complete'"):
                break
            time.sleep(0.05)
        assert browser.evaluate("document.getElementById('tip').hidden") is True
        rect = browser.evaluate("JSON.stringify(document.querySelectorAll('.tok')[3].getBoundingClientRect())")
        box = json.loads(rect)
        browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=box["x"] + box["width"] / 2,
                     y=box["y"] + box["height"] / 2)
        assert browser.evaluate("document.getElementById('tip').hidden") is False
        tables = browser.evaluate("[...document.querySelectorAll('#tip table')].map(t => [t.caption.textContent,"
                                  " t.querySelectorAll('tr').length])")
        assert tables == [["teacher top 5", 5], ["student top 5", 5]]
        data = json.loads(browser.evaluate("document.getElementById('fd-data').textContent"))[3]
        rows = browser.evaluate("[...document.querySelector('#tip table').rows].map(r => [...r.cells].map("
                                "c => c.textContent))")
        assert [token for token, _ in rows] == [token for token, _ in data["t"]]
        assert [float(p) for _, p in rows] == pytest.approx([p for _, p in data["t"]], rel=1e-2)
    finally:
        browser.close()

"""The FD signal viewer: one episode's response, each generated token colored by log p_teacher - log p_student.

    python -m trainer.viewer --episodes E.jsonl --model DIR [--teacher DIR] [--index N] --out page.html

Which episode: `--index N` is record N of the file (from 0), and it must have feedback;
without `--index`, the first episode that has feedback. The student scores the episode's
`token_ids`; the teacher scores `feedback.teacher_prompt_ids` followed by the same response
tokens, aligned exactly as FD training aligns them (`trainer.batches`), one forward each.
The teacher has the student's weights unless `--teacher` names other ones: a model (the
forms `--model` takes) or a checkpoint directory `checkpoints/step-N`, whose EMA teacher
(in its `trainer_state.pt`) is loaded into the student's architecture.

The page is one file that loads nothing: inline CSS, the per-token top-5 data as JSON and a
small tooltip script. Red: the teacher, having read the feedback, finds the token more likely
than the student does; blue: less likely. Tool turns (no loss) are shown greyed.
"""

from __future__ import annotations

import argparse
import copy
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent.episode import Episode, read_episodes
from agent.models import load_model, load_tokenizer
from trainer.algorithms import hidden_states, lm_head_weight
from trainer.batches import Packed, TrainSequence, student_batch, teacher_batch
from trainer.lm_head import chunks, logits, upcast

TOP_K = 5
FEEDBACK_SOURCES = "claude, self, compiler, ground_truth or constant"


class ViewerError(ValueError):
    """Input the viewer cannot show; the message says what and why."""


@dataclass
class Scores:
    """Per trained position: log p(token), and the k most likely tokens with their probabilities."""

    logprob: torch.Tensor  # [N]
    top_ids: torch.Tensor  # [N, k]
    top_probs: torch.Tensor  # [N, k]


def pick_episode(path: str | Path, index: int | None) -> tuple[int, Episode]:
    """Record `index` (which must have feedback), or the first record with feedback."""
    episodes = list(read_episodes(path))
    if index is None:
        found = next(((i, e) for i, e in enumerate(episodes) if e.feedback is not None), None)
        if found is None:
            raise ViewerError(f"none of the {len(episodes)} episodes in {path} has feedback; roll out with "
                              f"--feedback ({FEEDBACK_SOURCES}), or train with algorithm=fd")
        return found
    if not 0 <= index < len(episodes):
        raise ViewerError(f"--index {index} is out of range: {path} holds {len(episodes)} episodes (0 to "
                          f"{len(episodes) - 1})")
    if episodes[index].feedback is None:
        raise ViewerError(f"episode {index} of {path} has no feedback; only episodes rolled out with a feedback "
                          f"source ({FEEDBACK_SOURCES}) have a teacher prompt to compare with")
    return index, episodes[index]


def model_dir(name: str) -> str:
    """A checkpoint directory stands for its `model/`; anything else is what `agent.models` loads."""
    inner = Path(name) / "model"
    return str(inner) if (inner / "config.json").exists() else name


def load_teacher(student: torch.nn.Module, teacher: str | None, device: str) -> torch.nn.Module:
    if teacher is None:
        return student
    state_file = Path(teacher) / "trainer_state.pt"
    if not state_file.exists():
        return load_model(model_dir(teacher), device=device)
    weights = torch.load(state_file, map_location="cpu", weights_only=False).get("teacher")
    if weights is None:
        raise ViewerError(f"{teacher} holds no EMA teacher (not an FD run); pass its model/ directory instead")
    model = copy.deepcopy(student)
    model.load_state_dict(weights)
    return model


@torch.no_grad()
def score(model: torch.nn.Module, packed: Packed, *, k: int = TOP_K, chunk: int = 512) -> Scores:
    """The model's log-probability of each trained target, and its top k there (full-vocabulary softmax)."""
    hidden, weight = hidden_states(model, packed), lm_head_weight(model)
    parts = []
    for sl in chunks(hidden.shape[0], chunk):
        logp = torch.log_softmax(upcast(logits(hidden[sl], weight)), dim=-1)
        top = logp.topk(k, dim=-1)
        parts.append((logp.gather(-1, packed.targets[sl, None])[:, 0], top.indices, top.values.exp()))
    return Scores(*(torch.cat(p) for p in zip(*parts, strict=True)))


def score_episode(episode: Episode, student: torch.nn.Module, teacher: torch.nn.Module,
                  device: str = "cpu") -> tuple[Scores, Scores]:
    """(student, teacher) scores of the episode's generated tokens, in order."""
    seq = TrainSequence.from_episode(episode, with_teacher=True)
    return score(student, student_batch([seq], device=device)), score(teacher, teacher_batch([seq], device=device))


# ---------------------------------------------------------------- the page

_CONTROLS = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"} | {0x7F: "\u2421"}


def _text(s: str) -> str:
    """Token text for the page: control characters as their visible symbols, then HTML-escaped."""
    return html.escape(s.translate(_CONTROLS))


def _shown(s: str) -> str:
    """A token alone (tooltip): whitespace made visible too."""
    return s.translate(_CONTROLS).replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")


def _g(x: float) -> float:
    """Four significant digits: small probabilities stay readable, the page stays small."""
    return float(f"{x:.4g}")


def color(value: float, clip: float) -> str:
    """Diverging scale: white at 0, red (positive) or blue (negative) at +-clip and beyond."""
    t = max(-1.0, min(1.0, value / clip))
    end = (214, 39, 40) if t > 0 else (31, 119, 180)
    r, g, b = (round(255 + (e - 255) * abs(t)) for e in end)
    return f"rgb({r},{g},{b})"


def default_clip(values: list[float]) -> float:
    """The 95th percentile of |log ratio|: a few outliers do not wash out the rest."""
    if not values:
        return 1.0
    q = sorted(abs(v) for v in values)[int(0.95 * (len(values) - 1))]
    return q if q > 0 else 1.0


def render(episode: Episode, tokenizer: Any, student: Scores, teacher: Scores, *, index: int,
           clip: float | None = None) -> str:
    ratio = (teacher.logprob - student.logprob).tolist()
    clip = clip or default_clip(ratio)
    response = episode.token_ids[episode.prompt_len:]
    mask = episode.loss_mask[episode.prompt_len:]

    def decoded(ids: list[int]) -> list[str]:
        return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)

    def tool(ids: list[int]) -> str:
        return f'<span class="tool">{_text(tokenizer.decode(ids, skip_special_tokens=False))}</span>'

    def top(scores: Scores, n: int) -> list[list]:
        return [[_shown(s), _g(p)] for s, p in zip(decoded(scores.top_ids[n].tolist()), scores.top_probs[n].tolist(),
                                                    strict=True)]

    spans, tips, tool_run, n = [], [], [], 0
    for token, text, trained in zip(response, decoded(response), mask, strict=True):
        if not trained:
            tool_run.append(token)
            continue
        if tool_run:
            spans.append(tool(tool_run))
            tool_run = []
        nl = " nl" if "\n" in text else ""
        spans.append(f'<span class="tok{nl}" data-i="{n}" data-logratio="{ratio[n]:.6g}" '
                     f'style="background:{color(ratio[n], clip)}">{_text(text)}</span>')
        tips.append({"x": _shown(text), "lr": _g(ratio[n]), "pt": _g(teacher.logprob[n].exp().item()),
                     "ps": _g(student.logprob[n].exp().item()), "t": top(teacher, n), "s": top(student, n)})
        n += 1
    if tool_run:
        spans.append(tool(tool_run))
    # JSON inside <script>: no "<", ">" or "&" may reach the HTML parser, so no token can close the element.
    data = json.dumps(tips, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    fb = episode.feedback
    assert fb is not None
    mean = sum(ratio) / len(ratio) if ratio else 0.0
    about = (f"episode {index} ({episode.episode_id}), problem {episode.problem.get('name', '?')}, reward "
             f"{episode.reward:g}, {episode.finish_reason}; {len(ratio)} generated tokens, mean log ratio {mean:+.4f}")
    return _PAGE.format(title=_text(f"FD signal: {episode.problem.get('name', '')}"), source=_text(fb.source),
                        feedback=_text(fb.text), about=_text(about), clip=f"{clip:.3g}", tokens="".join(spans),
                        data=data, script=_SCRIPT)


_SCRIPT = """
const data = JSON.parse(document.getElementById("fd-data").textContent);
const tip = document.getElementById("tip");
function num(p) { return p >= 0.001 ? p.toFixed(4) : p.toExponential(2); }
function cell(tag, text) { const c = document.createElement(tag); c.textContent = text; return c; }
function table(title, rows) {
  const t = document.createElement("table");
  t.className = "top";
  t.append(cell("caption", title));
  for (const [tok, p] of rows) {
    const r = document.createElement("tr");
    r.append(cell("td", tok), cell("td", num(p)));
    t.append(r);
  }
  return t;
}
document.addEventListener("mouseover", (e) => {
  const el = e.target.closest(".tok");
  if (!el) { tip.hidden = true; return; }
  const d = data[Number(el.dataset.i)];
  tip.replaceChildren(
    cell("div", `${d.x}   log p_T - log p_S = ${d.lr.toFixed(4)}   (p_T ${num(d.pt)}, p_S ${num(d.ps)})`),
    table("teacher top 5", d.t), table("student top 5", d.s));
  const box = el.getBoundingClientRect();
  tip.style.left = `${Math.min(box.left, window.innerWidth - 420)}px`;
  tip.style.top = `${box.bottom + 6}px`;
  tip.hidden = false;
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.5 sans-serif; margin: 1.5em; max-width: 70em; }}
.feedback {{ white-space: pre-wrap; background: #fff8e1; border: 1px solid #e0c060; padding: .6em; }}
.response {{ font: 13px/1.7 monospace; white-space: pre-wrap; word-break: break-all; }}
.tok {{ border-radius: 2px; cursor: default; }}
.tok:hover {{ outline: 1px solid #000; }}
.nl::before {{ content: "\\21b5"; color: #888; }}
.tool {{ color: #999; background: #f2f2f2; }}
.legend {{ display: flex; flex-wrap: wrap; align-items: center; gap: .5em; margin: .8em 0; }}
.bar {{ width: 16em; height: 1em; border: 1px solid #aaa;
  background: linear-gradient(to right, rgb(31,119,180), #fff, rgb(214,39,40)); }}
#tip {{ position: fixed; background: #fff; border: 1px solid #555; padding: .4em; font: 12px monospace;
  box-shadow: 2px 2px 6px #0004; white-space: pre; }}
.top {{ display: inline-table; margin: .3em .8em 0 0; border-collapse: collapse; vertical-align: top; }}
.top td {{ padding: 0 .5em; border-top: 1px solid #ddd; }}
</style></head><body>
<h3>Feedback ({source})</h3>
<div class="feedback">{feedback}</div>
<p>{about}</p>
<div class="legend">log p_teacher &minus; log p_student: <span>&minus;{clip}</span><span class="bar"></span>
<span>+{clip}</span> (clipped; red: the teacher finds the token more likely; grey: tool turns, no loss)</div>
<div class="response">{tokens}</div>
<div id="tip" hidden></div>
<script type="application/json" id="fd-data">{data}</script>
<script>{script}</script>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.viewer", description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", required=True, type=Path, help="an episode log (JSONL)")
    parser.add_argument("--model", required=True, help="the student: a named model, a model or checkpoint directory")
    parser.add_argument("--teacher", help="other teacher weights: a model, or a checkpoint directory's EMA teacher")
    parser.add_argument("--index", type=int, help="record N of the log (default: the first with feedback)")
    parser.add_argument("--clip", type=float, help="color range +-C in nats (default: 95th percentile of |value|)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, type=Path, help="the HTML page to write")
    args = parser.parse_args(argv)
    if args.clip is not None and args.clip <= 0:
        parser.error(f"--clip must be > 0, got {args.clip}")
    try:
        index, episode = pick_episode(args.episodes, args.index)
        name = model_dir(args.model)
        student = load_model(name, device=args.device)
        teacher = load_teacher(student, args.teacher, args.device)
    except (ViewerError, OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    scores = score_episode(episode, student, teacher, args.device)
    page = render(episode, load_tokenizer(name), *scores, index=index, clip=args.clip)
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out}: episode {index}, {len(scores[0].logprob)} generated tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

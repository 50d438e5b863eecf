"""Judge prompts built from the taxonomy (English and Chinese), and defensive parsing of the answers.

A prompt is a chat (system + one user turn). The user turn is split in two parts so that local judges can
reuse the key/value cache of the first part:

* the *shared prefix*: the conversation and both responses, in a fixed order (position 1, position 2) and
  the task category; it is the same for every capability point asked about that ordered pair;
* the *question*: "which response is better in terms of X?" for one capability point (pairwise mode), or
  for all points of the category at once with a JSON answer (JSON mode).

The generic capability :data:`OVERALL` ("overall quality and helpfulness") is what label-quality reports
use to compare a judge with human preferences that are not per capability.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dmoerm.data import Message
from dmoerm.taxonomy import Capability, Category

LANGUAGES = ("en", "zh")
"""Prompt languages."""

TIE = "tie"

OVERALL = Capability(
    name="overall",
    definition=(
        "overall quality and helpfulness: how well the response fulfils the user's request, following "
        "the instructions, being correct, relevant, complete and clear"
    ),
    definition_zh="整体质量与有用性：回复在多大程度上完成了用户的请求，包括遵循指令、正确、切题、完整和清晰",
)
"""A generic capability point for judging overall preference (label-quality reports against human labels)."""

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


def detect_language(texts: str | Sequence[str], threshold: float = 0.2) -> str:
    """``"zh"`` when CJK ideographs are at least ``threshold`` of the text's units, else ``"en"``.

    A unit is one CJK ideograph or one Latin word (an ideograph carries about a word's worth of meaning), so
    a Chinese request with some English code is still Chinese, and an English text naming 北京 is English.
    """
    text = texts if isinstance(texts, str) else "\n".join(texts)
    cjk = len(_CJK.findall(text))
    units = cjk + len(_LATIN_WORD.findall(text))
    return "zh" if units and cjk / units >= threshold else "en"


_TEXT = {
    "en": {
        "system": (
            "You are an impartial expert judge. You compare two AI assistant responses to the same "
            "conversation, judging only the aspect you are asked about."
        ),
        "roles": {"system": "System", "user": "User", "assistant": "Assistant"},
        "conversation": "[Conversation]",
        "response": "[Response {i}]",
        "end_response": "[End of Response {i}]",
        "category": "Task category: {name}. {description}",
        "truncated": "[... truncated]",
        "question": (
            "Which response is better in terms of {title}? {title} means: {definition}\n"
            "Judge only this aspect and ignore all others. Answer with a single character: {l1} or {l2}."
        ),
        "json_intro": "For each aspect below, decide which response is better in terms of that aspect alone:",
        "json_item": '- "{name}": {definition}',
        "json_answer": (
            'Answer with only a JSON object that maps each aspect name to "{l1}", "{l2}" or "tie", '
            "for example {example}."
        ),
    },
    "zh": {
        "system": "你是一名公正的专家评审。你比较两个 AI 助手对同一段对话的回复，只评判被问到的那个方面。",
        "roles": {"system": "系统", "user": "用户", "assistant": "助手"},
        "conversation": "[对话]",
        "response": "[回复 {i}]",
        "end_response": "[回复 {i} 结束]",
        "category": "任务类别：{name}。{description}",
        "truncated": "[……已截断]",
        "question": (
            "就“{title}”而言，哪个回复更好？“{title}”指：{definition}\n"
            "只评判这一方面，忽略其他方面。只回答一个字符：{l1} 或 {l2}。"
        ),
        "json_intro": "对下面每个方面，只就该方面判断哪个回复更好：",
        "json_item": '- "{name}"：{definition}',
        "json_answer": '只回答一个 JSON 对象，把每个方面的名称映射为 "{l1}"、"{l2}" 或 "tie"，例如 {example}。',
    },
}


def _title(cap: Capability) -> str:
    return cap.name.replace("_", " ")


def _definition(cap: Capability, language: str) -> str:
    if language == "zh" and cap.definition_zh:
        return cap.definition_zh
    return cap.definition


def _truncate(text: str, max_chars: int | None, marker: str, keep: str = "head") -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    if keep == "tail":
        return marker + "\n" + text[-max_chars:]
    return text[:max_chars] + "\n" + marker


@dataclass(frozen=True)
class PromptParts:
    """One ordered comparison rendered as a chat, split for prefix reuse."""

    system: str
    prefix: str
    """User-turn text shared by every question about this ordered pair."""
    questions: tuple[str, ...]
    """One question per capability point (pairwise mode), or a single JSON question (JSON mode)."""

    def messages(self, i: int) -> list[dict]:
        """The chat for question ``i`` in the OpenAI message format."""
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.prefix + self.questions[i]},
        ]


@dataclass(frozen=True)
class PromptBuilder:
    """Builds judge prompts; the answer labels and truncation limits are part of the judge's identity."""

    labels: tuple[str, str] = ("1", "2")
    """How the two positions are named in the prompt and the answer (``("1", "2")`` or ``("A", "B")``)."""
    max_chars_response: int | None = 6000
    """Each response is cut to this many characters (head kept); None keeps everything."""
    max_chars_conversation: int | None = 8000
    """The rendered conversation is cut to this many characters (tail kept: the last turns matter most)."""

    def __post_init__(self) -> None:
        if len(self.labels) != 2 or self.labels[0] == self.labels[1] or not all(self.labels):
            raise ValueError(f"labels: need two distinct non-empty labels, got {self.labels!r}")

    def identity(self) -> str:
        return (
            f"labels={''.join(self.labels)},maxr={self.max_chars_response},maxc={self.max_chars_conversation}"
        )

    def _prefix(
        self,
        conversation: Sequence[Message],
        first: str,
        second: str,
        category: Category | None,
        language: str,
    ) -> str:
        t = _TEXT[language]
        conv = "\n\n".join(f"{t['roles'][m.role]}: {m.content.strip()}" for m in conversation)
        conv = _truncate(conv, self.max_chars_conversation, t["truncated"], keep="tail")
        parts = [t["conversation"], conv, ""]
        for label, resp in ((self.labels[0], first), (self.labels[1], second)):
            parts += [
                t["response"].format(i=label),
                _truncate(resp.strip(), self.max_chars_response, t["truncated"]),
                t["end_response"].format(i=label),
                "",
            ]
        if category is not None:
            desc = (
                category.description_zh
                if language == "zh" and category.description_zh
                else category.description
            )
            parts += [t["category"].format(name=category.name.replace("_", " "), description=desc), ""]
        return "\n".join(parts)

    def pairwise(
        self,
        conversation: Sequence[Message],
        first: str,
        second: str,
        category: Category | None,
        capabilities: Sequence[Capability],
        language: str = "en",
    ) -> PromptParts:
        """One question per capability point: "which is better in terms of X? answer 1 or 2"."""
        _check_language(language)
        t = _TEXT[language]
        l1, l2 = self.labels
        questions = tuple(
            t["question"].format(title=_title(c), definition=_definition(c, language), l1=l1, l2=l2)
            for c in capabilities
        )
        return PromptParts(
            t["system"], self._prefix(conversation, first, second, category, language), questions
        )

    def all_capabilities(
        self,
        conversation: Sequence[Message],
        first: str,
        second: str,
        category: Category | None,
        capabilities: Sequence[Capability],
        language: str = "en",
    ) -> PromptParts:
        """One question for all capability points of a category, answered as a JSON object."""
        _check_language(language)
        t = _TEXT[language]
        l1, l2 = self.labels
        example = json.dumps({c.name: (l1 if i % 2 == 0 else l2) for i, c in enumerate(capabilities[:2])})
        lines = [t["json_intro"]]
        lines += [
            t["json_item"].format(name=c.name, definition=_definition(c, language)) for c in capabilities
        ]
        lines.append(t["json_answer"].format(l1=l1, l2=l2, example=example))
        return PromptParts(
            t["system"], self._prefix(conversation, first, second, category, language), ("\n".join(lines),)
        )

    # ----------------------------------------------------------------------------------------------- parsing

    def parse_choice(self, text: str | None) -> str | None:
        """The position an answer names: ``"1"`` (first), ``"2"`` (second), ``"tie"``, or None if unclear.

        Accepts a bare label, a label in quotes/bold/brackets, "Response 2", "回复 1", "Answer: B" and the like.
        Returns the *position* ("1"/"2") whatever the configured labels are.
        """
        if text is None:
            return None
        s = text.strip()
        s = re.sub(r"<think>.*?</think>", "", s, flags=re.S).strip()  # reasoning models
        core = s.strip(" \t\n\"'`*.。:：()[]【】")
        l1, l2 = self.labels
        if core.upper() == l1.upper():
            return "1"
        if core.upper() == l2.upper():
            return "2"
        if core.lower() in ("tie", "equal", "same", "both", "平局", "相同", "一样"):
            return TIE
        esc = "|".join(re.escape(x) for x in (l1, l2))
        m = re.search(rf"(?:response|answer|output|回复|答案)\s*[:：]?\s*\**\s*({esc})\b", s, flags=re.I)
        if m is None:
            m = re.search(rf"(?:response|output|回复)\s*({esc})", s, flags=re.I)
        if m is not None:
            return "1" if m.group(1).upper() == l1.upper() else "2"
        found = set(re.findall(rf"(?<![\w.])({esc})(?![\w.])", s, flags=re.I if l1.isalpha() else 0))
        found = {f.upper() for f in found}
        if len(found) == 1:
            return "1" if found.pop() == l1.upper() else "2"
        return None

    def parse_json(self, text: str | None, capabilities: Sequence[Capability]) -> dict[str, str]:
        """Per-capability positions from a JSON answer (in code fences, prose or bare); missing keys omitted.

        Keys match capability names case-insensitively, with spaces or hyphens for underscores; values may be
        labels, "Response 1", numbers or "tie". Returns ``{}`` when no JSON object can be found.
        """
        obj = extract_json_object(text or "")
        if not isinstance(obj, dict):
            return {}
        norm = {_norm_key(k): v for k, v in obj.items() if isinstance(k, str)}
        out: dict[str, str] = {}
        for cap in capabilities:
            for key in (_norm_key(cap.name), _norm_key(_title(cap))):
                if key in norm:
                    v = norm[key]
                    if isinstance(v, dict):  # {"winner": "1", "reason": ...}
                        v = next((v[k] for k in ("winner", "better", "answer", "choice") if k in v), None)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        v = str(int(v))
                    choice = self.parse_choice(v) if isinstance(v, str) else None
                    if choice is not None:
                        out[cap.name] = choice
                    break
        return out


def _norm_key(k: str) -> str:
    return re.sub(r"[\s\-_]+", "_", k.strip().lower())


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"language: {language!r} is not one of {', '.join(LANGUAGES)}")


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def _balanced_objects(text: str) -> list[str]:
    """Every top-level ``{...}`` substring, with braces in strings ignored."""
    out, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start : i + 1])
    return out


def _loads_lenient(s: str):
    for candidate in (s, re.sub(r",\s*([}\]])", r"\1", s)):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
        try:  # single-quoted pseudo-JSON
            return json.loads(re.sub(r"'", '"', candidate))
        except json.JSONDecodeError:
            pass
    return None


def extract_json_object(text: str):
    """The first JSON object found in ``text``: fenced code blocks first, then any balanced ``{...}``."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in candidates:
        for obj_text in _balanced_objects(chunk):
            obj = _loads_lenient(obj_text)
            if isinstance(obj, dict):
                return obj
    return None

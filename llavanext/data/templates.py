"""Chat templates as data: a conversation becomes text segments, each trained or masked.

Only assistant turns and their end-of-turn marker are trained; system, user and image
positions are masked. `<image>` stays a marker here: the encoder expands it.
"""

from __future__ import annotations

from dataclasses import dataclass

from llavanext.errors import ConfigError, DataError

IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


def content_text(content):
    """A turn's text: a string, or OpenAI/HF content parts where an image part becomes `<image>\\n`."""
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        return None
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text += IMAGE + "\n"
        elif kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        else:
            return None
    return text


def normalise(conversations) -> list[tuple[str, str]]:
    """LLaVA's `from/value` or OpenAI's `role/content` turns as (role, text) pairs."""
    if not isinstance(conversations, list):
        raise DataError(f"conversations is a {type(conversations).__name__}, not a list of turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        text = content_text(turn.get("value", turn.get("content")))
        if role not in ROLES:
            raise DataError(f"turn {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(text, str):
            raise DataError(f"turn {i} has no text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"turn {i} has non-UTF-8 text") from None
        if ROLES[role] == "assistant" and not text.strip():
            raise DataError(f"turn {i} is an empty assistant answer")
        turns.append((ROLES[role], text))
    return turns


def split_system(turns):
    if turns and turns[0][0] == "system":
        return turns[0][1], turns[1:]
    return None, turns


def check_alternation(turns) -> None:
    if not turns:
        raise DataError("empty conversation")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"turn {i} is {role!r} where {expected!r} was expected (turns must alternate)")
    if turns[-1][0] != "assistant":
        raise DataError("conversation ends without an assistant answer")


class Template:
    name: str
    eos: str = "</s>"

    def render(self, conversations, *, generation: bool = False) -> list[Segment]:
        """Segments for training; with `generation`, the prompt up to where the answer starts."""
        system, turns = split_system(normalise(conversations))
        if generation:
            if not turns or turns[-1][0] != "user":
                raise DataError("a generation prompt must end with a user turn")
            turns = turns + [("assistant", None)]
            for i, (role, _) in enumerate(turns):
                if role != ("user" if i % 2 == 0 else "assistant"):
                    raise DataError(f"turn {i} is {role!r}: turns must alternate user/assistant")
        else:
            check_alternation(turns)
        segments = []
        for i in range(0, len(turns), 2):
            segments += self.turn(turns[i][1], turns[i + 1][1], first=i == 0, system=system)
        return [s for s in segments if s.text]

    def turn(self, user: str, assistant: str | None, *, first: bool, system: str | None) -> list[Segment]:
        raise NotImplementedError


class Plain(Template):
    """LLaVA's stage-1 template: the image, then the caption; the user's words are dropped."""

    name = "plain"

    def turn(self, user, assistant, *, first, system):
        prompt = IMAGE * user.count(IMAGE)
        return [Segment(prompt, False)] + ([Segment(assistant + "\n", True)] if assistant is not None else [])


class VicunaV1(Template):
    """llava-v1.6-vicuna: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""

    name = "vicuna_v1"

    def turn(self, user, assistant, *, first, system):
        prefix = (system or VICUNA_SYSTEM) + " " if first else ""
        out = [Segment(f"{prefix}USER: {user} ASSISTANT:", False)]
        if assistant is not None:
            out.append(Segment(f" {assistant}{self.eos}", True))
        return out


class MistralInstruct(Template):
    """llava-v1.6-mistral: `[INST] q [/INST] a</s>[INST] ...` (a system prompt joins the first turn)."""

    name = "mistral_instruct"

    def turn(self, user, assistant, *, first, system):
        if first and system:
            user = f"{system}\n\n{user}"
        out = [Segment(f"[INST] {user} [/INST]", False)]
        if assistant is not None:
            out.append(Segment(f" {assistant}{self.eos}", True))
        return out


class ChatML(Template):
    """`<|im_start|>role\\n...<|im_end|>\\n` (Qwen, Hermes, llava-v1.6-34b)."""

    name = "chatml"
    eos = "<|im_end|>"

    def turn(self, user, assistant, *, first, system):
        prefix = f"<|im_start|>system\n{system}<|im_end|>\n" if first and system else ""
        out = [Segment(f"{prefix}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False)]
        if assistant is not None:
            out += [Segment(f"{assistant}{self.eos}", True), Segment("\n", False)]
        return out


TEMPLATES = {t.name: t for t in (Plain(), VicunaV1(), MistralInstruct(), ChatML())}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]

"""Intent recognition from a tenant's labelled examples, and what to do with it.

Pure Python, no model files: text becomes a sparse TF-IDF vector of character n-grams
(Chinese has no spaces, and n-grams survive typos and inflection in English), and the
classifier scores each intent by cosine similarity to the intent's centroid and to its
nearest example. A softmax with a temperature fitted on a validation fold turns scores
into confidences, so the 0.92 threshold means "about 92 % likely right".

``decide`` turns a prediction into an action: answer from the FAQ, answer with a
model, ask a clarifying question, or hand off to a human.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

# --- text features ------------------------------------------------------------------

_HAN = re.compile(r"[\u3400-\u9fff]+")
_LATIN = re.compile(r"[a-z0-9']+")

SparseVector = dict[str, float]


def normalize(text: str) -> str:
    """Full-width to half-width, lower case, one space between words."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def terms(text: str) -> Counter[str]:
    """Word unigrams and 3-4 character n-grams for Latin script; characters and
    character bigrams for Han."""
    norm = normalize(text)
    out: Counter[str] = Counter()
    for word in _LATIN.findall(norm):
        out["w:" + word] += 1
        padded = f" {word} "
        for n in (3, 4):
            for i in range(len(padded) - n + 1):
                out[padded[i : i + n]] += 1
    for run in _HAN.findall(norm):
        out.update(run)
        for i in range(len(run) - 1):
            out[run[i : i + 2]] += 1
    return out


def cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(w * b.get(t, 0.0) for t, w in a.items())


def _unit(vector: SparseVector) -> SparseVector:
    norm = math.sqrt(sum(w * w for w in vector.values()))
    return {t: w / norm for t, w in vector.items()} if norm else {}


class Vectorizer:
    """Sublinear TF times IDF, L2-normalised. Terms never seen in fitting get the
    highest IDF: a rare word is informative, not noise."""

    def __init__(self, documents: Iterable[str]) -> None:
        df: Counter[str] = Counter()
        count = 0
        for doc in documents:
            df.update(set(terms(doc)))
            count += 1
        self._idf = {t: math.log((1 + count) / (1 + n)) + 1.0 for t, n in df.items()}
        self._unseen = math.log(1 + count) + 1.0

    def vector(self, text: str) -> SparseVector:
        return _unit(
            {
                t: (1.0 + math.log(n)) * self._idf.get(t, self._unseen)
                for t, n in terms(text).items()
            }
        )


# --- intents ------------------------------------------------------------------------

ACTIONS = ("faq", "llm", "handoff")


@dataclass(frozen=True, slots=True)
class IntentSpec:
    intent: str
    action: str  # faq | llm | handoff
    label: Mapping[str, str]  # language -> how a clarifying question names it
    examples: Mapping[str, tuple[str, ...]]  # language -> example questions
    answer: Mapping[str, str] = field(default_factory=dict)  # for action "faq"

    def labelled(self) -> list[tuple[str, str, str]]:
        """(text, intent, language) for every example."""
        return [(t, self.intent, lang) for lang, ts in self.examples.items() for t in ts]


def load_intents(path: str | Path | None = None) -> list[IntentSpec]:
    """A tenant's intents file, or the packaged bilingual set."""
    text = (
        Path(path).read_text("utf-8")
        if path
        else (resources.files("streams") / "knowledge" / "intents.json").read_text("utf-8")
    )
    specs = []
    for item in json.loads(text)["intents"]:
        if item.get("action", "llm") not in ACTIONS:
            raise ValueError(f"intent {item['intent']!r}: unknown action {item['action']!r}")
        specs.append(
            IntentSpec(
                intent=item["intent"],
                action=item.get("action", "llm"),
                label=dict(item.get("label", {})),
                examples={k: tuple(v) for k, v in item["examples"].items()},
                answer=dict(item.get("answer", {})),
            )
        )
    return specs


def with_answers(
    specs: Sequence[IntentSpec], answers: Mapping[str, Mapping[str, str]]
) -> list[IntentSpec]:
    """Give intents without an answer of their own the FAQ's answer for that intent."""
    return [
        s if s.answer or s.intent not in answers else replace(s, answer=dict(answers[s.intent]))
        for s in specs
    ]


@dataclass(frozen=True, slots=True)
class Prediction:
    ranked: tuple[tuple[str, float], ...]  # (intent, confidence), best first
    similarity: float  # the best raw score: low means "like nothing we know"

    @property
    def intent(self) -> str | None:
        return self.ranked[0][0] if self.ranked else None

    @property
    def confidence(self) -> float:
        return self.ranked[0][1] if self.ranked else 0.0


class IntentClassifier:
    """Centroid plus nearest-neighbour cosine scores, softmax-calibrated."""

    def __init__(self, examples: Sequence[tuple[str, str]], temperature: float | None = None):
        if not examples:
            raise ValueError("an intent classifier needs labelled examples")
        self.vectorizer = Vectorizer(text for text, _ in examples)
        self._fit([(self.vectorizer.vector(t), label) for t, label in examples])
        self.temperature = temperature or self._fit_temperature(examples)

    def _fit(self, vectors: Sequence[tuple[SparseVector, str]]) -> None:
        self.labels = sorted({label for _, label in vectors})
        sums: dict[str, defaultdict[str, float]] = {lb: defaultdict(float) for lb in self.labels}
        self._postings: defaultdict[str, list[tuple[int, float]]] = defaultdict(list)
        self._example_label: list[str] = []
        for index, (vector, label) in enumerate(vectors):
            for t, w in vector.items():
                sums[label][t] += w
                self._postings[t].append((index, w))
            self._example_label.append(label)
        self._centroids = {lb: _unit(dict(s)) for lb, s in sums.items()}

    def scores(self, vector: SparseVector) -> dict[str, float]:
        dots: defaultdict[int, float] = defaultdict(float)
        for t, w in vector.items():
            for index, ew in self._postings.get(t, ()):
                dots[index] += w * ew
        # Mean of the two nearest examples per intent: one lucky overlap is not enough.
        best: dict[str, list[float]] = {lb: [0.0, 0.0] for lb in self.labels}
        for index, dot in dots.items():
            pair = best[self._example_label[index]]
            if dot > pair[1]:
                pair[1] = dot
                if dot > pair[0]:
                    pair[0], pair[1] = dot, pair[0]
        return {
            lb: 0.5 * cosine(vector, self._centroids[lb]) + 0.25 * (best[lb][0] + best[lb][1])
            for lb in self.labels
        }

    def predict_vector(self, vector: SparseVector, temperature: float | None = None) -> Prediction:
        scores = self.scores(vector)
        tau = temperature or self.temperature
        top = max(scores.values()) if scores else 0.0
        exp = {lb: math.exp(tau * (s - top)) for lb, s in scores.items()}
        total = sum(exp.values())
        ranked = sorted(((lb, e / total) for lb, e in exp.items()), key=lambda x: -x[1])
        return Prediction(tuple((lb, round(p, 4)) for lb, p in ranked), round(top, 4))

    def predict(self, text: str) -> Prediction:
        return self.predict_vector(self.vectorizer.vector(text))

    def _fit_temperature(self, examples: Sequence[tuple[str, str]]) -> float:
        """The temperature that minimises the log loss on a validation fold (every
        fifth example), scored by a classifier trained on the other four fifths."""
        train = [e for i, e in enumerate(examples) if i % 5]
        valid = [e for i, e in enumerate(examples) if not i % 5]
        if len({lb for _, lb in train}) < 2 or not valid:
            return 20.0
        probe = IntentClassifier(train, temperature=1.0)
        scored = [(probe.scores(probe.vectorizer.vector(t)), label) for t, label in valid]
        best, best_loss = 20.0, math.inf
        for tau in (5.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 70.0):
            loss = 0.0
            for scores, label in scored:
                top = max(scores.values())
                total = sum(math.exp(tau * (s - top)) for s in scores.values())
                p = math.exp(tau * (scores.get(label, 0.0) - top)) / total
                loss -= math.log(max(p, 1e-12))
            if loss < best_loss:
                best, best_loss = tau, loss
        return best


# --- decisions ----------------------------------------------------------------------

FAQ, LLM, CLARIFY, HANDOFF = "faq", "llm", "clarify", "handoff"


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # faq | llm | clarify | handoff
    intent: str | None
    confidence: float
    alternatives: tuple[str, ...] = ()  # the intents a clarifying question offers


def decide(
    prediction: Prediction,
    specs: Mapping[str, IntentSpec],
    threshold: float = 0.92,
    clarify_floor: float = 0.25,
    hint_floor: float = 0.5,
) -> Decision:
    """Confident (≥ threshold): hand off, answer from the FAQ, or ask a model, as the
    intent says. Not confident but two intents together are: ask which one. Otherwise
    a model answers (with the top intent as a hint when it is at least plausible)."""
    ranked = prediction.ranked
    if not ranked:
        return Decision(LLM, None, 0.0)
    (top, p1), second = ranked[0], ranked[1] if len(ranked) > 1 else ("", 0.0)
    spec = specs.get(top)
    if p1 >= threshold and spec is not None:
        if spec.action == HANDOFF:
            return Decision(HANDOFF, top, p1)
        if spec.action == FAQ and spec.answer:
            return Decision(FAQ, top, p1)
        return Decision(LLM, top, p1)
    if second[1] >= clarify_floor and p1 + second[1] >= threshold:
        return Decision(CLARIFY, top, p1, (top, second[0]))
    return Decision(LLM, top if p1 >= hint_floor else None, p1)


CLARIFY_TEXT = {
    "en": "Just to be sure I help with the right thing: is this about {a} or {b}?",
    "zh": "为了更好地帮您，请问您是想咨询{a}，还是{b}？",
}


def clarifying_question(decision: Decision, specs: Mapping[str, IntentSpec], lang: str) -> str:
    names = [
        specs[i].label.get(lang) or specs[i].label.get("en") or i.replace("_", " ")
        for i in decision.alternatives
        if i in specs
    ]
    a, b = [*names, "something else", "something else"][:2]
    return CLARIFY_TEXT.get(lang, CLARIFY_TEXT["en"]).format(a=a, b=b)


# --- evaluation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evaluation:
    train: int
    test: int
    accuracy: float
    by_language: Mapping[str, float]
    threshold: float
    coverage: float  # share of test questions at or above the threshold
    accuracy_above: float  # accuracy on those
    temperature: float
    misses: tuple[tuple[str, str, str], ...]  # (text, expected, predicted)


def split(specs: Sequence[IntentSpec], every: int = 4) -> tuple[list[tuple[str, str, str]], ...]:
    """Deterministic held-out split: every ``every``-th example of each intent and
    language is test data."""
    train: list[tuple[str, str, str]] = []
    test: list[tuple[str, str, str]] = []
    for spec in specs:
        for lang, texts in spec.examples.items():
            for i, text in enumerate(texts):
                (test if i % every == every - 1 else train).append((text, spec.intent, lang))
    return train, test


def evaluate(specs: Sequence[IntentSpec], threshold: float = 0.92, every: int = 4) -> Evaluation:
    train, test = split(specs, every)
    model = IntentClassifier([(t, i) for t, i, _ in train])
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    above = above_hits = 0
    misses = []
    for text, intent, lang in test:
        prediction = model.predict(text)
        ok = prediction.intent == intent
        totals[lang] += 1
        hits[lang] += ok
        if prediction.confidence >= threshold:
            above += 1
            above_hits += ok
        if not ok:
            misses.append((text, intent, prediction.intent or ""))
    n = len(test)
    return Evaluation(
        train=len(train),
        test=n,
        accuracy=sum(hits.values()) / n if n else 0.0,
        by_language={lang: hits[lang] / totals[lang] for lang in sorted(totals)},
        threshold=threshold,
        coverage=above / n if n else 0.0,
        accuracy_above=above_hits / above if above else 0.0,
        temperature=model.temperature,
        misses=tuple(misses),
    )

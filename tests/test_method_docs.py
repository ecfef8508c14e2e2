"""Every method explains itself from its declaration: a plain paragraph and a paper link, shown on the page
where the method is chosen and in `merge-lab methods`, read from the MethodSpec (never a copy)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from components import handlers as h
from merging import workbench as wb
from merging.cli.main import main as cli_main
from merging.methods import all_specs, available
from merging.methods.base import _REGISTRY

URL = re.compile(r"^https://\S+$")


@pytest.mark.parametrize("name", available())
def test_every_method_has_a_plain_explanation_and_a_paper_link(name):
    spec = _REGISTRY[name]
    assert URL.match(spec.paper_url), f"{name}: paper link {spec.paper_url!r}"
    words = spec.explanation.split()
    # one paragraph: a few sentences, longer than the one-line summary, no line breaks or markup headings
    assert len(words) >= 25, f"{name}: explanation too short ({len(words)} words)"
    assert "\n" not in spec.explanation and not spec.explanation.startswith("#")
    assert spec.explanation != spec.summary


def test_explanations_say_what_happens_to_the_task_vectors():
    """Plain words about the deltas, not a name: each paragraph talks about task vectors (or, for SLERP and
    the linear soup, the weights) and none is another method's text."""
    texts = [s.explanation for s in all_specs()]
    assert len(set(texts)) == len(texts)
    for spec in all_specs():
        assert re.search(r"task vector|weights", spec.explanation), spec.name


@pytest.mark.parametrize("name", ["ties", "model_stock", "regmean", "apl"])
def test_page_text_for_the_selected_method_comes_from_the_declaration(name, monkeypatch):
    spec = _REGISTRY[name]
    shown = h.method_info(wb.Session(), name)
    assert spec.explanation in shown and f"]({spec.paper_url})" in shown
    # change the declaration: the page follows it (no copy of the text anywhere else)
    marker = f"Sentinel explanation of {name} for the test."
    monkeypatch.setitem(_REGISTRY, name, dataclasses.replace(spec, explanation=marker,
                                                             paper_url="https://example.org/paper"))
    shown = h.method_info(wb.Session(), name)
    assert marker in shown and "](https://example.org/paper)" in shown
    assert spec.explanation not in shown


def test_page_shows_each_parameter_help_from_the_declaration():
    """Beside the explanation, each control of the chosen method carries its declared help text."""
    for spec in all_specs():
        updates = dict(zip(h.PARAM_NAMES, h.param_updates(spec.name)))
        for p in spec.params:
            if p.name in updates:
                assert updates[p.name]["info"] == p.help, (spec.name, p.name)


def test_cli_methods_prints_each_explanation_and_paper(capsys):
    assert cli_main(["methods"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # the explanation is wrapped
    for spec in all_specs():
        assert " ".join(spec.explanation.split()) in text, spec.name
        assert f"paper: {spec.paper_url}" in text
    assert cli_main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert all(listed[s.name]["explanation"] == s.explanation for s in all_specs())

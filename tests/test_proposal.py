"""docs/proposal/overlay-networking.md stays complete and true to the implementation.

Every section of the OCA change-request template is present and filled, every JSON
example decodes with the project's own codecs, and every benchmark command named in the
performance section runs a script that exists under ``bench/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from router.wire import frames
from router.wire import overlay_frames as overlay
from topology.messages import parse_payload

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "proposal" / "overlay-networking.md"
TEMPLATE = Path("/work/shared/seeds/ocpp-change-request-template.md")

HEADINGS = [
    "### 1.1 Proposal Title",
    "### 1.2 Proposal Date",
    "### 1.3 Proponent",
    "### 1.4 OCPP and IETF RFC References",
    "### 1.5 Current Status",
    "### 2.1 Abstract",
    "### 2.2 Problem Statement",
    "### 2.3 Rationale",
    "### 3.1 Current State",
    "### 3.2 Proposed Change",
    "### 3.3 Compatibility",
    "### 3.4 Risks and Mitigation",
    "### 3.5 Performance Implications",
    "### 3.6 Security Considerations",
    "### 4.1 Testing Methodology",
    "### 4.2 Expected Results",
    "### 5.1 Implementation Plan",
    "### 5.2 Deployment Plan",
    "### 5.3 Rollback Plan",
    "### 6.1 Summary",
    "### 6.2 Call for Consensus",
    "### 6.3 Review Period",
]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[a-z]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```",
                    re.DOTALL | re.MULTILINE)


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _json_blocks() -> list[tuple[int, str]]:
    text = _text()
    return [(text.count("\n", 0, m.start()) + 1, m.group("body"))
            for m in _FENCE.finditer(text) if m.group("lang") == "json"]


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^#{2,3} ", text[start + len(heading):], re.MULTILINE)
    end = start + len(heading) + following.start() if following else len(text)
    return text[start + len(heading):end]


def test_template_headings_match_the_list() -> None:
    if not TEMPLATE.exists():
        pytest.skip("template not available")
    template = TEMPLATE.read_text(encoding="utf-8")
    found = re.findall(r"^### \d\.\d .+$", template, re.MULTILINE)
    assert [h.strip() for h in found] == HEADINGS


@pytest.mark.parametrize("heading", HEADINGS)
def test_every_section_is_present_and_filled(heading: str) -> None:
    text = _text()
    assert re.search(rf"^{re.escape(heading)}\s*$", text, re.MULTILINE), heading
    body = _section(text, heading).strip()
    assert len(body) >= 8, f"{heading} is (nearly) empty"


@pytest.mark.parametrize("marker", ["(Provide", "(Describe", "TODO", "TBD"])
def test_no_placeholder_text(marker: str) -> None:
    assert marker not in _text()


def _is_overlay_frame(value: Any) -> bool:
    return (isinstance(value, list) and len(value) >= 3 and isinstance(value[0], int)
            and isinstance(value[1], str) and isinstance(value[2], list))


def _is_standard_frame(value: Any) -> bool:
    return (isinstance(value, list) and len(value) in (3, 4, 5) and value[0] in (2, 3, 4, 6)
            and isinstance(value[1], str) and not isinstance(value[2], list))


def _check(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        for item in value:
            assert _is_overlay_frame(item)
            overlay.from_list(item)
        return "batch"
    if _is_overlay_frame(value):
        frame = overlay.from_list(value)
        if frame.action == "NotifyNetworkTopology":
            parse_payload(frame.payload)
        return "overlay"
    if _is_standard_frame(value):
        frames.decode(json.dumps(value), frames.Version.V21)
        return "standard"
    if isinstance(value, dict) and "networkTopologyInformation" in value:
        parse_payload(value)
        return "topology"
    raise AssertionError(f"not a frame or topology payload: {value!r}")


def test_json_examples_exist() -> None:
    kinds = {_check(json.loads(body)) for _, body in _json_blocks()}
    assert {"overlay", "standard", "topology"} <= kinds


@pytest.mark.parametrize(("line", "body"), _json_blocks(),
                         ids=[f"line{n}" for n, _ in _json_blocks()])
def test_json_example_decodes(line: int, body: str) -> None:
    _check(json.loads(body))


def test_every_json_fence_is_checked() -> None:
    assert len(_json_blocks()) == _text().count("```json")


def test_sequence_diagram_present() -> None:
    assert "```mermaid" in _text() and "sequenceDiagram" in _text()


def test_benchmark_commands_name_existing_scripts() -> None:
    perf = _section(_text(), "### 3.5 Performance Implications")
    commands = re.findall(r"`(\.venv/bin/python bench/[^`]+)`", perf)
    assert len(commands) >= 6, commands
    scripts = set()
    for command in commands:
        script = re.search(r"bench/([\w.-]+\.py)", command)
        assert script, command
        assert (ROOT / "bench" / script.group(1)).is_file(), command
        scripts.add(script.group(1))
    assert {"forwarding.py", "overlay.py", "firewall.py", "routes.py", "failover.py",
            "fanout.py"} <= scripts
    # every script mentioned anywhere in the section exists too
    for name in re.findall(r"bench/([\w.-]+\.py)", perf):
        assert (ROOT / "bench" / name).is_file(), name

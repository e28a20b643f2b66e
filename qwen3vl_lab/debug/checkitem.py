"""One line of the doctor's checklist, and the list: pass / warn / fail / skip with the evidence it was decided on.

A FAIL means broken: something measured changes the answers (or a piece an image prompt needs is missing).
A WARN is a known risk that was measured and found not to change the answers beyond the line's stated budget:
the evidence says what was measured and why it is not a failure. SKIP: the line does not apply here."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx


@dataclass
class CheckItem:
    key: str
    title: str
    status: str  # "pass", "warn", "fail" or "skip"
    evidence: str
    fix: str = ""
    measured: dict = field(default_factory=dict)  # the figures the status was decided on, for the advice and plots

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclass
class Checklist:
    folder: str
    items: list[CheckItem]

    @property
    def failed(self) -> list[CheckItem]:
        return [i for i in self.items if i.status == "fail"]

    @property
    def warned(self) -> list[CheckItem]:
        return [i for i in self.items if i.status == "warn"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def item(self, key: str) -> CheckItem:
        return next(i for i in self.items if i.key == key)

    def status(self) -> dict[str, str]:
        return {i.key: i.status for i in self.items}

    def table(self) -> str:
        lines = [f"checklist for {self.folder}"]
        for i in self.items:
            lines.append(f"  [{i.status.upper():4s}] {i.title}: {i.evidence}")
            if i.status == "fail" and i.fix:
                lines.append(f"         fix: {i.fix}")
        lines.append(f"  {sum(i.status == 'pass' for i in self.items)} pass, {len(self.warned)} warn, "
                     f"{len(self.failed)} fail, {sum(i.status == 'skip' for i in self.items)} skip")
        return "\n".join(lines)


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as a plain dict."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

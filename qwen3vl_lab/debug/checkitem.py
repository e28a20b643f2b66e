"""One line of the doctor's checklist, and the list: pass / fail / skip with the evidence it was decided on."""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass
class CheckItem:
    key: str
    title: str
    status: str  # "pass", "fail" or "skip"
    evidence: str
    fix: str = ""

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
        lines.append(f"  {sum(i.status == 'pass' for i in self.items)} pass, {len(self.failed)} fail, "
                     f"{sum(i.status == 'skip' for i in self.items)} skip")
        return "\n".join(lines)


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as a plain dict."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

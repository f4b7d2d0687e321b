"""The operator's file: which tenants a frontend acts for, which labels a host carries.

Spec (``scheduler.service.operator_config``): a YAML mapping with
``frontends`` (frontend name -> non-empty list of tenant globs) and
``host_labels`` (host glob -> label mapping, applied in file order, later
wins); anything else is an ``OperatorConfigError`` naming the file and the key
at fault; the file is at most 1 MiB; labels under ``operator.tessera/`` come
from this file only (an agent's are dropped), and the operator's labels
override the agent's of the same key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.scheduler.service.operator_config import (
    OPERATOR_PREFIX,
    OperatorConfig,
    OperatorConfigError,
    load_operator_config,
)
from tessera.v1 import inventory_pb2

VALID = """\
# Tenants each frontend identity may act for (glob patterns).
frontends:
  portal: ["acme", "team-*"]
  batch-runner: [globex]
# Labels by host id (glob patterns, applied in file order; later wins).
host_labels:
  "dgx-*": {tier: gold, operator.tessera/rack: r1}
  dgx-07: {tier: quarantine}
  "ws-?": {gpus: 2}
"""


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "operator.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_a_valid_file_parses(tmp_path: Path) -> None:
    config = load_operator_config(write(tmp_path, VALID))
    assert config.frontend_grants == {"portal": ("acme", "team-*"), "batch-runner": ("globex",)}
    assert config.host_labels == (
        ("dgx-*", {"tier": "gold", "operator.tessera/rack": "r1"}),
        ("dgx-07", {"tier": "quarantine"}),
        ("ws-?", {"gpus": "2"}),
    )


def test_no_file_and_an_empty_file_grant_nothing(tmp_path: Path) -> None:
    assert load_operator_config(None) == OperatorConfig()
    assert load_operator_config(write(tmp_path, "")) == OperatorConfig()
    assert load_operator_config(write(tmp_path, "frontends:\nhost_labels:\n")) == OperatorConfig()


#: A hostile or mistyped file, and a piece of text the refusal must contain.
HOSTILE: dict[str, tuple[str | bytes, str]] = {
    "not a mapping (a list)": ("- portal\n- acme\n", "must be a mapping"),
    "not a mapping (a string)": ("just words\n", "must be a mapping"),
    "an unknown top-level key": ("frontends: {}\nadmins: [root]\n", "'admins'"),
    "a misspelt top-level key": ("frontend:\n  portal: [acme]\n", "'frontend'"),
    "frontends that are a list": ("frontends: [portal]\n", "frontends"),
    "a frontend with no patterns": ("frontends:\n  portal: []\n", "frontends.portal"),
    "a frontend with a null grant": ("frontends:\n  portal:\n", "frontends.portal"),
    "a frontend granted a bare string": ("frontends:\n  portal: acme\n", "frontends.portal"),
    "a bad frontend name": ('frontends:\n  "por tal!": [acme]\n', "frontends.por tal!"),
    "a frontend name with a slash": ('frontends:\n  "a/b": [acme]\n', "frontends.a/b"),
    "a frontend name ending in a newline": (
        'frontends:\n  "portal\\n": [acme]\n',
        "frontends.portal",
    ),
    "a frontend pattern that is a list": (
        "frontends:\n  portal: [[acme]]\n",
        "frontends.portal[0]",
    ),
    "an empty frontend pattern": ('frontends:\n  portal: [""]\n', "frontends.portal[0]"),
    "host labels that are a list": ("host_labels: [dgx-07]\n", "host_labels"),
    "a host's labels that are a list": ("host_labels:\n  dgx-07: [gold]\n", "host_labels.dgx-07"),
    "a label value that is a list": (
        "host_labels:\n  dgx-07: {tier: [gold, silver]}\n",
        "host_labels.dgx-07.tier",
    ),
    "a label value that is a mapping": (
        "host_labels:\n  dgx-07: {tier: {a: b}}\n",
        "host_labels.dgx-07.tier",
    ),
    "a label value that is null": ("host_labels:\n  dgx-07: {tier: }\n", "host_labels.dgx-07.tier"),
    "a label value with a newline": (
        'host_labels:\n  dgx-07: {tier: "gold\\nevil: 1"}\n',
        "host_labels.dgx-07.tier",
    ),
    "a label value with an escape character": (
        'host_labels:\n  dgx-07: {tier: "gold\\e[31m"}\n',
        "host_labels.dgx-07.tier",
    ),
    "a label value with a DEL character": (
        'host_labels:\n  dgx-07: {tier: "gold\\x7f"}\n',
        "host_labels.dgx-07.tier",
    ),
    "a label value with a C1 control character": (
        'host_labels:\n  dgx-07: {tier: "gold\\x9b31m"}\n',
        "host_labels.dgx-07.tier",
    ),
    "a label value of 257 characters": (
        f"host_labels:\n  dgx-07: {{tier: {'g' * 257}}}\n",
        "host_labels.dgx-07.tier",
    ),
    "a label key with a control character": (
        'host_labels:\n  dgx-07: {"ti\\ter": gold}\n',
        "host_labels.dgx-07",
    ),
    "a label key with a space": ('host_labels:\n  dgx-07: {"my tier": gold}\n', "my tier"),
    "a host pattern with a control character": (
        'host_labels:\n  "dgx-\\x01": {tier: gold}\n',
        "host_labels.dgx-",
    ),
    "a 2 MiB file": (
        b"frontends:\n  portal: [acme]\n" + b"# padding\n" * (2 * 1024 * 1024 // 10),
        "larger than 1 MiB",
    ),
    "invalid YAML": ("frontends: {portal: [acme\n", "not YAML"),
    "a YAML tag that builds an object": (
        "frontends: !!python/object/apply:os.system [echo hi]\n",
        "not YAML",
    ),
}


@pytest.mark.parametrize(("text", "names"), [pytest.param(*v, id=k) for k, v in HOSTILE.items()])
def test_a_hostile_file_is_refused_naming_the_key(
    tmp_path: Path, text: str | bytes, names: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(OperatorConfigError) as err:
        load_operator_config(path)
    message = str(err.value)
    assert str(path) in message
    assert names in message
    assert len(message) < 1000


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(OperatorConfigError, match="--operator-config"):
        load_operator_config(tmp_path / "nowhere.yaml")


def test_a_file_of_exactly_1_mib_is_read(tmp_path: Path) -> None:
    head = b"frontends:\n  portal: [acme]\n"
    body = head + b"#" * (1024 * 1024 - len(head) - 1) + b"\n"
    assert len(body) == 1024 * 1024
    assert load_operator_config(write(tmp_path, body)).frontend_grants == {"portal": ("acme",)}


# -- apply(): what the agent says, what the operator says ------------------------------


def inventory(host_id: str, **labels: str) -> inventory_pb2.HostInventory:
    return inventory_pb2.HostInventory(host_id=host_id, labels=labels)


def test_an_agents_reserved_labels_are_dropped(tmp_path: Path) -> None:
    config = load_operator_config(write(tmp_path, "host_labels:\n  other: {a: b}\n"))
    report = inventory("dgx-07", gpu="a100")
    report.labels[OPERATOR_PREFIX + "tier"] = "secure"
    report.labels[OPERATOR_PREFIX + "rack"] = "r9"
    config.apply(report)
    assert dict(report.labels) == {"gpu": "a100"}


def test_the_operators_labels_override_the_agents_of_the_same_key(tmp_path: Path) -> None:
    config = load_operator_config(write(tmp_path, VALID))
    report = inventory("dgx-07", tier="secure", gpu="a100")
    report.labels[OPERATOR_PREFIX + "rack"] = "r9"
    config.apply(report)
    assert dict(report.labels) == {
        "gpu": "a100",  # the agent's own, untouched
        "tier": "quarantine",  # dgx-* says gold, dgx-07 comes later and wins
        OPERATOR_PREFIX + "rack": "r1",  # the operator's, not the agent's r9
    }


def test_later_patterns_win(tmp_path: Path) -> None:
    text = 'host_labels:\n  dgx-07: {tier: quarantine}\n  "dgx-*": {tier: gold}\n'
    config = load_operator_config(write(tmp_path, text))
    assert config.labels_for("dgx-07") == {"tier": "gold"}


@pytest.mark.parametrize(
    ("host", "labels"),
    [
        pytest.param("dgx-01", {"tier": "gold", "operator.tessera/rack": "r1"}, id="dgx-01"),
        pytest.param("ws-1", {"gpus": "2"}, id="ws-1"),
        pytest.param("ws-10", {}, id="ws-10 (? is one character)"),
        pytest.param("DGX-01", {}, id="DGX-01 (patterns are case-sensitive)"),
        pytest.param("x-dgx-01", {}, id="x-dgx-01 (patterns match the whole id)"),
    ],
)
def test_labels_for_matches_whole_host_ids(
    tmp_path: Path, host: str, labels: dict[str, str]
) -> None:
    assert load_operator_config(write(tmp_path, VALID)).labels_for(host) == labels


def test_a_host_the_operator_does_not_name_keeps_its_own_plain_labels(tmp_path: Path) -> None:
    config = load_operator_config(write(tmp_path, VALID))
    report = inventory("node-3", tier="secure")
    config.apply(report)
    assert dict(report.labels) == {"tier": "secure"}

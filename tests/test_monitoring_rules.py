"""The shipped PrometheusRule is valid for promtool, every alert is unit-tested firing and not
firing, each links a runbook section that exists, and only names metrics the proxy exposes.

Mutations of the rules (a renamed metric, a flipped threshold, a dropped ``for``) make the unit
tests fail: they can tell a broken rule from a good one.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from session_proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULE_FILE = ROOT / "manifests" / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.test.yaml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RULE_FILES_LINE = "rule_files: [rules.yaml]"
METRIC_NAME = re.compile(r"(?<![\w:])[a-z0-9_:]*session_proxy_[a-z0-9_:]+")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool (Debian package prometheus) is required; .ci/run installs it"
    return path


def rule_groups() -> dict[str, Any]:
    """The PrometheusRule's spec: a plain Prometheus rule file."""
    document = yaml.safe_load(RULE_FILE.read_text())
    assert document["kind"] == "PrometheusRule"
    spec: dict[str, Any] = document["spec"]
    return spec


def rules(groups: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in groups["groups"] for rule in group["rules"]]


def alerts(groups: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules(groups) if "alert" in rule}


def write_rules(groups: dict[str, Any], directory: Path) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(groups, sort_keys=False))
    return path


def run_unit_tests(groups: dict[str, Any], directory: Path) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` on every unit-test file, against ``groups``."""
    rule_path = write_rules(groups, directory)
    test_paths = []
    for source in UNIT_TESTS:
        # Text, not a YAML round trip: PyYAML would read series values like 0x10 as hex numbers.
        text = source.read_text()
        assert RULE_FILES_LINE in text, f"{source.name} must say {RULE_FILES_LINE}"
        target = directory / source.name
        target.write_text(text.replace(RULE_FILES_LINE, f"rule_files: [{json.dumps(str(rule_path))}]"))
        test_paths.append(str(target))
    return subprocess.run(
        [promtool(), "test", "rules", *test_paths], capture_output=True, text=True, timeout=120
    )


def exposed_names() -> set[str]:
    """Every sample name the proxy's registry can expose (histograms without children too)."""
    names: set[str] = set()
    family: Metric
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


def runbook_anchors() -> set[str]:
    """GitHub-style anchors of the runbook's headings."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.timeout(60)
def test_promtool_check_rules(tmp_path: Path) -> None:
    """`promtool check rules` accepts the PrometheusRule's groups."""
    result = subprocess.run(
        [promtool(), "check", "rules", str(write_rules(rule_groups(), tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.timeout(120)
def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    """`promtool test rules` passes every unit test in tests/prometheus/."""
    assert UNIT_TESTS
    result = run_unit_tests(rule_groups(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(30)
def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Each alert has a unit-test case where it fires and one where it stays silent."""
    firing: set[str] = set()
    silent: set[str] = set()
    for source in UNIT_TESTS:
        for case in yaml.safe_load(source.read_text())["tests"]:
            for check in case.get("alert_rule_test") or []:
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alerts(rule_groups()))
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


@pytest.mark.timeout(30)
def test_every_alert_explains_itself_and_links_its_runbook_section() -> None:
    """summary, description and runbook_url on every alert; the URL's anchor is a runbook heading."""
    anchors = runbook_anchors()
    for name, alert in alerts(rule_groups()).items():
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        url = annotations["runbook_url"]
        assert url.split("#")[0].endswith("docs/runbook.md"), url
        assert url.split("#")[1] == name.lower(), url
        assert name.lower() in anchors, f"docs/runbook.md has no section {name}"


@pytest.mark.timeout(30)
def test_rules_name_only_metrics_the_proxy_exposes() -> None:
    """Every session_proxy_* name in a rule is a series the proxy exposes or a recording rule."""
    groups = rule_groups()
    known = exposed_names()
    for rule in rules(groups):
        if "record" in rule:
            known.add(rule["record"])
    used = {name for rule in rules(groups) for name in METRIC_NAME.findall(rule["expr"])}
    assert used
    assert used - known == set()


def _alert(groups: dict[str, Any], name: str) -> dict[str, Any]:
    return alerts(groups)[name]


Mutation = Callable[[dict[str, Any]], None]
MUTATIONS: list[tuple[str, Mutation]] = [
    ("a renamed metric in an alert", lambda g: _alert(g, "SessionProxyExecsAtConcurrencyCap").update(
        expr="session_proxy_exec_inflight >= session_proxy_exec_in_flight_limit")),
    ("a flipped threshold", lambda g: _alert(g, "SessionProxyWorkspaceNotReady").update(
        expr="session_proxy_workspace_ready == 1")),
    ("a dropped for", lambda g: _alert(g, "SessionProxyDown").pop("for")),
    ("a transport outcome left out", lambda g: rules(g)[2].update(
        expr=rules(g)[2]["expr"].replace("transport_lost|", ""))),
    ("the volume guard dropped", lambda g: _alert(g, "SessionProxyExecTransportFailures").update(
        expr="namespace:session_proxy_exec_transport_failures:ratio_rate5m > 0.1")),
    ("401 no longer watched", lambda g: _alert(g, "SessionProxyKubernetesCredentialsRejected").update(
        expr=_alert(g, "SessionProxyKubernetesCredentialsRejected")["expr"].replace("401|", ""))),
    ("another job's targets", lambda g: _alert(g, "SessionProxyDown").update(expr="up == 0")),
]  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mistake", "mutate"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, mistake: str, mutate: Mutation) -> None:
    """Breaking the rules in this way makes `promtool test rules` fail."""
    broken = copy.deepcopy(rule_groups())
    mutate(broken)
    result = run_unit_tests(broken, tmp_path)
    assert result.returncode != 0, f"the unit tests did not notice: {mistake}"
